"""Shared helpers of the localisation methods: layer parameters, group accuracy of a model on a run's data."""
from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from ..data import Dataset
from ..hooks import SiteError, batched_forward, require_eval
from ..models import layer_names


def layer_keys(model: nn.Module, layer: str, buffers: bool = True) -> list[str]:
    """state_dict keys of the parameters (and, if ``buffers``, buffers) under module path ``layer``."""
    names = layer_names(model, head=True)
    mods = dict(model.named_modules())
    if layer not in mods or not layer:
        raise SiteError(f"{type(model).__name__} has no layer {layer!r}; its layers are {names}.")
    prefix = layer + "."
    keys = [k for k, _ in model.named_parameters() if k.startswith(prefix)]
    if buffers:
        keys += [k for k, _ in model.named_buffers() if k.startswith(prefix)]
    if not keys:
        raise SiteError(f"Layer {layer!r} owns no parameters; layers with parameters are {names}.")
    return keys


def resolve_layers(model: nn.Module, layers: str | list[str] | None, head: bool = False) -> list[str]:
    """``layers`` checked against the model, or the default of :func:`memloc.models.layer_names` (with the
    head if ``head``)."""
    if layers is None:
        names = layer_names(model, head=head)
        if not names:
            raise SiteError(f"{type(model).__name__} has no layer but its head "
                            f"{layer_names(model, head=True)}; pass layers= explicitly.")
        return names
    layers = [layers] if isinstance(layers, str) else list(layers)
    for layer in layers:
        layer_keys(model, layer)
    return layers


def predictions(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Argmax predictions ``[N]`` of an eval-mode model on inputs ``[N, ...]``."""
    require_eval(model)
    out = [logits.argmax(1).cpu() for _, logits in batched_forward(model, x, batch_size)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def group_accuracies(model: nn.Module, data: Dataset, batch_size: int = 2048) -> dict[str, float]:
    """Accuracy against the training labels for the ``clean``, ``noisy`` and ``test`` groups."""
    correct = (predictions(model, data.x, batch_size) == data.y).numpy()
    return {g: float(correct[data.group == g].mean()) if (data.group == g).any() else float("nan")
            for g in ("clean", "noisy", "test")}


def long_accuracy_rows(acc: dict[str, float], data: Dataset, **cols) -> list[dict]:
    return [{**cols, "group": g, "accuracy": a, "n": int((data.group == g).sum())} for g, a in acc.items()]


def frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if "group" in df:
        df["group"] = df["group"].astype(str)
    return df


def seeded_generator(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)

