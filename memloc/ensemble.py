"""Many small models trained at once, each on its own random subset of the training examples.

The ensemble behind Feldman-Zhang memorization and influence, the C-score and LiRA's shadow models. Models'
parameters are stacked along a leading dimension and trained with ``torch.func.vmap`` over
``functional_call``: one forward and one backward pass serve ``chunk`` models, each with its own minibatch from
its own subset in its own order. The loss is the *sum* of the models' mean losses, so each model's gradient is
exactly its own, and Adam/SGD act elementwise, so one optimiser over the stacked tensors is the same as one per
model. ``train_ensemble(..., method="loop")`` trains the same models one after another (the reference the
batched path is tested against).

Models with BatchNorm cannot be stacked this way (their running statistics are per model state updated in
place); use BN-free models (``mlp``, ``cnn1d`` with ``batch_norm=False``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import Dataset
from .models import build_model

__all__ = ["Ensemble", "train_ensemble", "subset_masks"]


def subset_masks(n_models: int, n_train: int, ratio: float, seed: int = 0, balanced: bool = False) -> np.ndarray:
    """``[n_models, n_train]`` bool: which training examples each model trains on.

    Each model gets ``floor(ratio * n_train)`` examples drawn without replacement (Feldman & Zhang). With
    ``balanced`` (LiRA's scheme, ratio 0.5), every example is in exactly ``round(ratio * n_models)`` models.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"The 'ratio' parameter must be in (0, 1). Got {ratio!r} instead.")
    rng = np.random.default_rng(seed)
    if balanced:
        keep = np.argsort(rng.random((n_models, n_train)), axis=0) < round(ratio * n_models)
        return keep
    k = int(math.floor(ratio * n_train))
    masks = np.zeros((n_models, n_train), dtype=bool)
    for m in range(n_models):
        masks[m, rng.choice(n_train, k, replace=False)] = True
    return masks


@dataclass
class Ensemble:
    """Trained ensemble: which examples each model saw and what it predicts on every example.

    Attributes:
        masks: ``[M, n_train]`` bool, training membership (train examples in ``train_ids`` order).
        train_ids, test_ids: example ids of the columns.
        correct_train, correct_test: ``[M, n_train]`` / ``[M, n_test]`` bool, prediction == training label.
        phi_train, phi_test: ``[M, n]`` float32 LiRA statistic ``log p_y - log sum_{y' != y} p_y'``.
        settings: what produced it.
    """

    masks: np.ndarray
    train_ids: np.ndarray
    test_ids: np.ndarray
    correct_train: np.ndarray
    correct_test: np.ndarray
    phi_train: np.ndarray
    phi_test: np.ndarray
    settings: dict = field(default_factory=dict)

    @property
    def n_models(self) -> int:
        return len(self.masks)

    def save(self, path: str | Path) -> Path:
        """Atomically write the ensemble's arrays (safetensors) with its settings."""
        import json

        from safetensors.numpy import save_file

        from .results import atomic_path

        arrays = {k: np.ascontiguousarray(getattr(self, k)) for k in
                  ("train_ids", "test_ids", "phi_train", "phi_test")}
        arrays.update({k: np.ascontiguousarray(getattr(self, k)).astype(np.uint8) for k in
                       ("masks", "correct_train", "correct_test")})
        with atomic_path(path) as tmp:
            save_file(arrays, str(tmp), metadata={"settings": json.dumps(self.settings)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Ensemble":
        import json

        from safetensors import safe_open
        from safetensors.numpy import load_file

        a = load_file(str(path))
        with safe_open(str(path), "np") as f:
            settings = json.loads(f.metadata()["settings"])
        return cls(masks=a["masks"].astype(bool), train_ids=a["train_ids"], test_ids=a["test_ids"],
                   correct_train=a["correct_train"].astype(bool), correct_test=a["correct_test"].astype(bool),
                   phi_train=a["phi_train"], phi_test=a["phi_test"], settings=settings)


def _phi(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LiRA's logit-scaled confidence ``log p_y - log(1 - p_y)``, computed stably. ``[..., K]``, ``[...]``."""
    logp = torch.log_softmax(logits.double(), -1)
    lp_y = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = logp.scatter(-1, y.unsqueeze(-1), float("-inf")).logsumexp(-1)
    return (lp_y - others).float()


def _check_bn(model: nn.Module) -> None:
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bn:
        raise ValueError(f"Ensembles stack models without BatchNorm; this model has BatchNorm at {bn[:3]}. "
                         "Use model='mlp' or model_kwargs={'batch_norm': False}.")


def _make_opt(name: str, params, lr: float, momentum: float, weight_decay: float):
    # fused kernels: one pass over each stacked tensor (Adam's step was ~28% of ensemble time with foreach)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    raise ValueError(f"The 'optimizer' parameter must be 'sgd' or 'adam'. Got {name!r} instead.")


def _orders(masks: np.ndarray, seed: int, model_index: np.ndarray, epoch: int) -> torch.Tensor:
    """Per model, its subset's positions in this epoch's order: ``[M, k]``."""
    out = []
    for m, mi in enumerate(model_index):
        pos = torch.as_tensor(np.flatnonzero(masks[m]))
        g = torch.Generator().manual_seed((seed * 1_000_003 + int(mi)) * 1_009 + epoch)
        out.append(pos[torch.randperm(len(pos), generator=g)])
    return torch.stack(out)


def _train_chunk(data: Dataset, masks: np.ndarray, model_index: np.ndarray, cfg: dict, progress_bar) -> list[dict]:
    """Train the models ``model_index`` (subsets ``masks``) together; return their final state_dicts."""
    from torch.func import functional_call, stack_module_state, vmap

    models = [build_model(cfg["model"], data.input_shape, data.num_classes, seed=cfg["seed"] * 100_003 + int(i),
                          **cfg["model_kwargs"]) for i in model_index]
    _check_bn(models[0])
    params, buffers = stack_module_state(models)
    base = models[0]
    opt = _make_opt(cfg["optimizer"], list(params.values()), cfg["lr"], cfg["momentum"], cfg["weight_decay"])

    def loss_one(p, b, x, y):
        return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

    batched_loss = vmap(loss_one, in_dims=(0, 0, 0, 0))
    train = data.train
    k = int(masks[0].sum())
    steps = math.ceil(k / cfg["batch_size"])
    for epoch in range(1, cfg["epochs"] + 1):
        order = _orders(masks, cfg["seed"], model_index, epoch)
        for s in range(steps):
            idx = order[:, s * cfg["batch_size"]:(s + 1) * cfg["batch_size"]]
            loss = batched_loss(params, buffers, train.x[idx], train.y[idx]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        progress_bar.update(len(model_index))
    return [{k: v[m].detach() for k, v in {**params, **buffers}.items()} for m in range(len(model_index))]


def _train_one(data: Dataset, mask: np.ndarray, model_index: int, cfg: dict) -> dict:
    """The reference: one model, its own optimiser, the same subset, order and initialisation."""
    model = build_model(cfg["model"], data.input_shape, data.num_classes, seed=cfg["seed"] * 100_003 + model_index,
                        **cfg["model_kwargs"])
    _check_bn(model)
    opt = _make_opt(cfg["optimizer"], list(model.parameters()), cfg["lr"], cfg["momentum"], cfg["weight_decay"])
    train = data.train
    steps = math.ceil(int(mask.sum()) / cfg["batch_size"])
    model.train()
    for epoch in range(1, cfg["epochs"] + 1):
        order = _orders(mask[None], cfg["seed"], np.array([model_index]), epoch)[0]
        for s in range(steps):
            idx = order[s * cfg["batch_size"]:(s + 1) * cfg["batch_size"]]
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def train_ensemble(data: Dataset, n_models: int = 64, ratio: float = 0.7, *, model: str = "mlp",
                   model_kwargs: dict | None = None, epochs: int = 30, optimizer: str = "adam", lr: float = 3e-3,
                   momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 128, seed: int = 0,
                   masks: np.ndarray | None = None, balanced: bool = False, chunk: int = 64, method: str = "batched",
                   progress: bool = True, return_states: bool = False) -> Ensemble | tuple[Ensemble, list[dict]]:
    """Train ``n_models`` models, model m on the training examples ``masks[m]``, and record their predictions.

    Args:
        data: the Dataset (labels in ``data.y`` are the training labels, flipped ones included).
        n_models, ratio, balanced: subsets from :func:`subset_masks` (seeded by ``seed``) unless ``masks`` is given.
        model, model_kwargs, epochs, optimizer, lr, momentum, weight_decay, batch_size: every model's training
            (a fixed number of epochs; constant learning rate).
        seed: model m is initialised with seed ``seed * 100003 + m`` and shuffles its subset per epoch from
            ``(seed, m, epoch)``: results do not depend on ``chunk`` or ``method``.
        chunk: models trained together in one vmapped pass (memory knob).
        method: ``"batched"`` or ``"loop"`` (one model at a time; the reference).
    Returns an :class:`Ensemble` (and the models' state_dicts with ``return_states``).
    """
    if method not in ("batched", "loop"):
        raise ValueError(f"The 'method' parameter must be 'batched' or 'loop'. Got {method!r} instead.")
    train = data.train
    if masks is None:
        masks = subset_masks(n_models, len(train), ratio, seed, balanced)
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != len(train):
        raise ValueError(f"masks must be [n_models, n_train={len(train)}] booleans; got shape {list(masks.shape)}.")
    sizes = masks.sum(1)
    if (sizes != sizes[0]).any() and method == "batched":
        raise ValueError("Batched ensembles need equal subset sizes (one step count for all models).")
    cfg = {"model": model, "model_kwargs": dict(model_kwargs or {}), "epochs": epochs, "optimizer": optimizer,
           "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "batch_size": batch_size, "seed": seed}
    M = len(masks)
    bar = tqdm(total=M * epochs, desc=f"ensemble of {M}", unit="model-epoch", disable=not progress, leave=False)
    states: list[dict] = []
    for s in range(0, M, chunk if method == "batched" else 1):
        idx = np.arange(s, min(M, s + (chunk if method == "batched" else 1)))
        if method == "batched":
            states += _train_chunk(data, masks[idx], idx, cfg, bar)
        else:
            states.append(_train_one(data, masks[idx[0]], int(idx[0]), cfg))
            bar.update(epochs)
    bar.close()
    ens = _evaluate(data, states, masks, cfg)
    ens.settings.update(cfg, n_models=M, ratio=float(masks[0].mean()), balanced=balanced, method=method)
    return (ens, states) if return_states else ens


def _evaluate(data: Dataset, states: list[dict], masks: np.ndarray, cfg: dict) -> Ensemble:
    from torch.func import functional_call

    base = build_model(cfg["model"], data.input_shape, data.num_classes, **cfg["model_kwargs"]).eval()
    train, test = data.train, data.test
    out = {"correct_train": [], "correct_test": [], "phi_train": [], "phi_test": []}
    with torch.no_grad():
        for s in range(0, len(states), 64):
            stacked = {k: torch.stack([st[k] for st in states[s:s + 64]]) for k in states[0]}
            for part, d in (("train", train), ("test", test)):
                logits = torch.vmap(lambda p, x: functional_call(base, p, (x,)), in_dims=(0, None))(stacked, d.x)
                out[f"correct_{part}"].append((logits.argmax(-1) == d.y).numpy())
                out[f"phi_{part}"].append(_phi(logits, d.y.expand(len(logits), -1)).numpy())
    return Ensemble(masks=masks, train_ids=train.example_id.numpy(), test_ids=test.example_id.numpy(),
                    **{k: np.concatenate(v) for k, v in out.items()})
