"""Unlearning: remove what a model memorized (a forget set) and measure it against an oracle retrained without it.

**Task protocol.** Every method here talks to the data through a *task*, so the same methods work for
classifiers (:class:`ClassifierTask`) and language models (an ``LMTask`` with the same five members):

- ``task.batches(ids, batch_size, seed=None, epoch=0)``: an iterator of batches over the examples ``ids``;
  shuffled by a private generator seeded with ``(seed, epoch)``, in the given order when ``seed`` is None. A
  batch is whatever the task's other members accept (here a dict ``x, y, original_label, example_id``).
- ``task.logits(model, batch)``: the forward pass (classifier ``[B, K]``; LM ``[B, T, V]``); the only member
  that calls the model.
- ``task.loss(logits, batch) -> [B]``: per-example loss (classifier: cross-entropy against the *training*
  label; LM: token NLL summed over the non-pad target tokens). ``-loss`` is the per-example log-probability
  that NPO needs.
- ``task.kl(logits, ref_logits, batch) -> [B]``: per-example KL(reference || model) (LM: summed over non-pad
  positions).
- ``task.per_example(model, ids) -> DataFrame``: ``example_id, loss`` plus the task's own metrics (classifier:
  ``acc`` against the training label, ``acc_original`` against the label before flipping); eval mode only.
- optional ``task.defaults``: ``{method: default parameters}``, the methods this task supports (default
  :data:`DEFAULTS`), and ``task.extra_methods``: ``{method: fn(new, ref, task, forget_ids, retain_ids, params, seed,
  progress) -> record entries}`` for methods only this task has (``fn`` changes ``new`` in place and returns at
  least ``changed``); the language-model task (:mod:`memloc.edit.unlearn_lm`) uses both.

**Splits.** :func:`forget_split` takes ``forget="noisy"`` (the flipped examples) or explicit training example
ids; retain = every other training example; holdout = the test examples (non-members for membership
inference).

**Oracle.** :func:`train_oracle` trains the run's own model (its factory: your model class for a run of your
model) with the run's own :class:`~memloc.train.TrainConfig` (same seed, same initialisation: the run's epoch-0
weights when it has them; same stopping rule), on the run's device, on the run's data minus the forget set,
into its own resumable folder, and records the excluded ids in its ``summary.json`` (``unlearn_oracle``).
``noise`` is set to 0 in its config because the data already carries the run's (flipped) labels; nothing is
re-drawn.

**Methods** (:func:`unlearn`; each works on a deep copy, is seeded, and returns a record of what it may have
changed). Fine-tuning methods take ``steps`` optimiser steps (Adam, ``lr``, no weight decay, ``schedule``
``constant`` or ``cosine``) with the modules that own trainable parameters in train mode (their BatchNorm
statistics update, and the record lists those buffers) and everything else in eval mode. Defaults
(:data:`DEFAULTS`): methods driven by the forget set take 100 steps of 64 at lr 1e-3; methods that train on the
retain set take 1000 steps of 128 at lr 3e-3 (the default testbed's own recipe, about 36 retain epochs; DEL
used 30):

- ``zero_units``: zero located units, permanently, by zeroing the unit's output slice in every parametrised
  submodule of its layer (the weight row and bias of a linear layer; a conv channel's kernel and its BatchNorm
  scale and shift): the unit is zeroed at the output of each of those submodules, as greedy ablation zeroes it.
  For a plain block (conv -> BN -> ReLU) that is exactly ``memloc.hooks.ablate(model, {layer: units})``. A
  residual block ``x + f(x)`` differs: zeroing the unit's parameters zeroes ``f(x)``'s channel, but the skip
  connection still carries ``x``'s channel, whereas ``ablate`` on the block zeroes the sum; there it equals
  ``ablate`` on the block's last parametrised submodule (``tests/test_own_model.py`` checks both). Units come from
  ``units={site: [indices]}``, or ``source="ablate"`` (greedy neuron ablation of the forget examples,
  :func:`~memloc.locate.greedy_flip`; the ``n_units`` units most often needed to flip one), or
  ``source="etd"`` (the memorization units of example-tied dropout, for a run trained with it).
- ``grad_ascent``: minimise ``-loss`` on the forget set.
- ``grad_diff``: ``forget_weight * (-loss_forget) + retain_weight * loss_retain`` (+ ``kl_weight`` x KL to the
  original model on retain batches); TOFU's GradDiff with weights 1, 1.
- ``npo``: ``-(2/beta) logsigmoid(-beta (log p - log p_ref))`` on forget batches, ``log p = -loss``, reference =
  the original model, ``beta = 0.1``, plus ``retain_weight * loss_retain`` (open-unlearning's NPO).
- ``finetune``: ``loss_retain`` only (forgetting by not seeing).
- ``reset_finetune`` (DEL, Torkzadehmahani et al.): score each unit (output channel / feature) of ``layers``
  (default: all but the head) by ``|theta * dL_forget/dtheta|`` summed over the forget set, per entry; the
  unit's score is the mean of its top ``top_entries`` (10%) entries; reset the global top ``fraction`` of units
  to a fresh seeded initialisation (``reset_parameters`` of the layer's submodules, BatchNorm statistics
  included) and fine-tune only them on the retain set, by multiplying gradients with the mask; the head is
  always trainable (not reset).
- ``random_reset``: the same number of units drawn at random: the control. With ``match="layers"`` (default)
  each layer gets as many random units as the localized mask has there, so both masks have the same size in
  units *and* parameters and differ only in which units of a layer; ``match="global"`` draws uniformly over
  all layers. (The localized score favours layers with few entries per unit: on the default testbed it picks
  50 of the 64 first-layer channels, whose units have 7 entries, against 8 of the second layer's.)

**Evaluation** (:func:`evaluate_unlearning`, :func:`compare_unlearning`): forget accuracy against the training
(flipped) labels and the original labels, retain and test accuracy, the loss attack's membership AUC (forget
members vs test non-members whose labels are flipped at the forget set's flip rate, so that "the label is
wrong" is not mistaken for membership; the oracle should sit near 0.5), and forget quality: the two-sample KS
test of per-example forget losses against the oracle's (TOFU), with a power check: the original model against
the oracle must give p < 0.05, or the test cannot tell and ``ks_can_tell`` is False.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..hooks import copy_model, require_eval
from ..locate.ablate import unit_slices
from ..results import load_result, make_result, save_result, write_json

__all__ = ["ClassifierTask", "Split", "forget_split", "train_oracle", "unlearn", "METHODS", "DEFAULTS",
           "located_units", "mia_auc", "forget_quality", "evaluate_unlearning", "compare_unlearning",
           "plot_tradeoff"]


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- the task

class Task:
    """The shared part of the task protocol: ``batches`` over ``self.batch(ids)``."""

    def batches(self, ids, batch_size: int, seed: int | None = None, epoch: int = 0) -> Iterator[dict]:
        ids = np.asarray(ids, dtype=np.int64)
        if seed is not None:
            ids = ids[torch.randperm(len(ids), generator=_generator(seed, epoch)).numpy()]
        for s in range(0, len(ids), batch_size):
            yield self.batch(ids[s:s + batch_size])


class ClassifierTask(Task):
    """The task protocol (module docstring) for a classifier trained on a :class:`~memloc.data.Dataset`.

    Args:
        data: the run's data (``run.data()``): training labels in ``data.y``, ``original_label`` before flips.
        etd: an :class:`~memloc.models.dropout.ExampleTiedDropout` (``run.etd()``); if given, every forward pass
            runs in its ``etd_mode`` (default ``"expect"``, how such a model is evaluated).
        eval_batch_size: batch size of :meth:`per_example`.
        device: where batches are put (the model's device).
    """

    def __init__(self, data: Dataset, etd=None, etd_mode: str = "expect", eval_batch_size: int = 1024,
                 device: str | torch.device = "cpu"):
        self.data, self.etd, self.etd_mode, self.eval_batch_size = data, etd, etd_mode, eval_batch_size
        self.device = torch.device(device)
        self._pos = pd.Series(np.arange(len(data)), index=data.example_id.numpy())

    @property
    def train_ids(self) -> np.ndarray:
        return self.data.example_id.numpy()[self.data.split == "train"]

    @property
    def test_ids(self) -> np.ndarray:
        return self.data.example_id.numpy()[self.data.split == "test"]

    def batch(self, ids) -> dict[str, torch.Tensor]:
        """``x [B, ...], y [B], original_label [B], example_id [B]`` for the given ids, in that order."""
        pos = torch.from_numpy(self._pos.loc[np.asarray(ids, dtype=np.int64)].to_numpy(copy=True))
        d, dev = self.data, self.device
        return {"x": d.x[pos].to(dev), "y": d.y[pos].to(dev), "original_label": d.original_label[pos].to(dev),
                "example_id": d.example_id[pos]}

    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """``[B, K]`` logits (under the example-tied dropout mode, if any)."""
        if self.etd is None:
            return model(batch["x"])
        with self.etd.apply(model, self.etd_mode):
            return model(batch["x"])

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """``[B]`` cross-entropy against the training labels."""
        return F.cross_entropy(logits, batch["y"], reduction="none")

    def kl(self, logits: torch.Tensor, ref_logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """``[B]`` KL(softmax(ref_logits) || softmax(logits))."""
        ref = F.log_softmax(ref_logits, 1)
        return (ref.exp() * (ref - F.log_softmax(logits, 1))).sum(1)

    def per_example(self, model: nn.Module, ids) -> pd.DataFrame:
        """``example_id, loss, acc, acc_original`` for the given ids (eval mode required)."""
        require_eval(model, "Unlearning evaluation")
        parts = []
        with torch.no_grad():
            for b in self.batches(ids, self.eval_batch_size):
                logits = self.logits(model, b)
                pred = logits.argmax(1)
                parts.append(pd.DataFrame({"example_id": b["example_id"].numpy(),
                                           "loss": self.loss(logits, b).float().cpu().numpy(),
                                           "acc": (pred == b["y"]).cpu().numpy(),
                                           "acc_original": (pred == b["original_label"]).cpu().numpy()}))
        return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------------------------- splits

@dataclass(frozen=True)
class Split:
    """Example ids of a forget/retain split: ``forget`` and ``retain`` partition the training examples,
    ``holdout`` are test examples (never trained on); ``name`` is ``"noisy"`` or ``"ids-<hash>"``."""

    forget: np.ndarray
    retain: np.ndarray
    holdout: np.ndarray
    name: str


def _ids_name(ids: np.ndarray) -> str:
    return "ids-" + hashlib.sha1(np.sort(ids).astype(np.int64).tobytes()).hexdigest()[:10]


def forget_split(data: Dataset, forget: str | Sequence[int] = "noisy") -> Split:
    """The forget/retain/holdout split of ``data`` for ``forget="noisy"`` (flipped examples) or explicit ids."""
    ids = data.example_id.numpy()
    train = ids[data.split == "train"]
    if isinstance(forget, str):
        if forget != "noisy":
            raise ValueError(f"The 'forget' parameter must be 'noisy' or a list of training example ids. "
                             f"Got {forget!r} instead.")
        fset = ids[data.group == "noisy"]
        if len(fset) == 0:
            raise ValueError("forget='noisy' but this run has no flipped labels (noise 0); pass example ids.")
        name = "noisy"
    else:
        fset = np.unique(np.asarray(list(forget), dtype=np.int64).reshape(-1))
        if len(fset) == 0:
            raise ValueError("The forget set is empty; give 'noisy' or at least one training example id.")
        bad = np.setdiff1d(fset, train)
        if len(bad):
            raise ValueError(f"Forget id(s) {bad[:10].tolist()} are not training examples; valid forget ids are "
                             f"the {len(train)} training ids ({int(train.min())}..{int(train.max())}).")
        name = _ids_name(fset)
    retain = np.setdiff1d(train, fset)
    if len(retain) == 0:
        raise ValueError("The forget set is the whole training set; nothing would be retained.")
    return Split(np.sort(fset), retain, ids[data.split == "test"], name)


# ----------------------------------------------------------------------------------------------- the oracle

def train_oracle(run, forget_ids, out: str | Path | None = None, progress: bool = True):
    """Retrain ``run``'s config on its data without ``forget_ids``; returns the oracle :class:`~memloc.train.Run`.

    ``out`` defaults to ``RUN/unlearn/<split name>/oracle``. Resumable (a finished oracle is reused after
    checking it excluded exactly these ids). The oracle's ``summary.json`` gets ``unlearn_oracle``:
    ``source_run``, ``excluded_ids``, ``n_excluded``.
    """
    from ..train import Run, train

    data = run.data()
    run.warn_default_recipe("the unlearning oracle")
    forget_ids = np.sort(np.asarray(forget_ids, dtype=np.int64))
    split = forget_split(data, forget_ids)
    if out is None:
        noisy = np.sort(data.example_id.numpy()[data.group == "noisy"])
        out = run.path / "unlearn" / ("noisy" if np.array_equal(forget_ids, noisy) else split.name) / "oracle"
    keep = ~np.isin(data.example_id.numpy(), forget_ids)
    cfg = run.config.to_dict()
    cfg["noise"] = 0.0  # the data already carries the run's labels; do not flip again
    init = run.checkpoint(0) if 0 in run.epochs else None
    own = None if run.factory.kind == "registry" else run.factory  # a registered model keeps its name in the config
    oracle = train(cfg, out, data=data.subset(keep), model=own, device=run.device, init=init, progress=progress)
    summary = oracle.summary
    seen = oracle.data()
    trained_on = seen.example_id.numpy()[seen.split == "train"]
    if np.isin(forget_ids, trained_on).any() or not np.array_equal(np.sort(trained_on), split.retain):
        from ..validate import OutputExistsError
        raise OutputExistsError(f"The oracle at {out} was not trained on exactly the retain set of this forget set; "
                           "remove the folder or choose another out=.")
    if "unlearn_oracle" not in summary:
        summary["unlearn_oracle"] = {"source_run": str(run.path), "excluded_ids": forget_ids.tolist(),
                                     "n_excluded": int(len(forget_ids))}
        write_json(summary, Path(out) / "summary.json")
    return Run(out, model=run.factory, device=run.device)


# ----------------------------------------------------------------------------------------------- units

def _units(model: nn.Module, layers=None):
    from ..locate.ablate import find_units
    from ..models import layer_names

    if layers is None:
        layers = layer_names(model)  # not the head: zeroing or resetting a class is not localisation
    return find_units(model, layers)


def located_units(model: nn.Module, task: ClassifierTask, forget_ids, source: str = "ablate", n_units: int = 8,
                  n_locate: int | None = None, seed: int = 0, layers=None, progress: bool = False) -> dict:
    """Units to zero: ``{layer: [indices]}``.

    ``source="ablate"``: greedy neuron ablation of (up to ``n_locate``, seeded sample) forget examples over
    ``layers`` (default all but the head); the ``n_units`` units used most often to flip them (ties: first
    found). ``source="etd"``: every memorization unit of the task's example-tied dropout.
    """
    if source == "etd":
        if task.etd is None:
            raise ValueError("source='etd' needs a run trained with example-tied dropout (ClassifierTask(etd=...)).")
        from ..hooks import neuron_dim, hooks

        sizes = {}
        with hooks(model, {s: (lambda out, s=s: sizes.__setitem__(s, out.shape[neuron_dim(model, s) % out.ndim]))
                           for s in task.etd.sites}), torch.no_grad():
            model(task.batch(np.asarray(forget_ids)[:1])["x"])
        return {s: list(task.etd.memorization_units(n)) for s, n in sizes.items()}
    if source != "ablate":
        raise ValueError(f"The 'source' parameter must be 'ablate' or 'etd'. Got {source!r} instead.")
    from ..locate.ablate import greedy_flip

    ids = np.asarray(forget_ids, dtype=np.int64)
    if n_locate is not None and n_locate < len(ids):
        ids = np.sort(ids[torch.randperm(len(ids), generator=_generator(seed, 7)).numpy()[:n_locate]])
    m = copy_model(model).eval()
    df = greedy_flip(m, task.data, ids, layers=_units(m, layers).layers, eval_size=0, seed=seed, progress=progress)
    counts = pd.Series([u for us in df.units for u in us]).value_counts(sort=False)
    counts = counts.sort_values(ascending=False, kind="stable").head(n_units)
    out: dict[str, list[int]] = {}
    for u in counts.index:
        layer, i = u.rsplit(":", 1)
        out.setdefault(layer, []).append(int(i))
    return {k: sorted(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- methods

_FORGET = {"steps": 100, "lr": 1e-3, "batch_size": 64, "schedule": "constant"}
_RETAIN = {"steps": 1000, "lr": 3e-3, "batch_size": 128, "schedule": "constant"}
DEFAULTS: dict[str, dict[str, Any]] = {
    "zero_units": {"units": None, "source": "auto", "n_units": 8, "n_locate": None, "layers": None},
    "grad_ascent": dict(_FORGET),
    "grad_diff": {**_FORGET, "forget_weight": 1.0, "retain_weight": 1.0, "kl_weight": 0.0},
    "npo": {**_FORGET, "beta": 0.1, "retain_weight": 1.0},
    "finetune": dict(_RETAIN),
    "reset_finetune": {**_RETAIN, "fraction": 0.3, "top_entries": 0.1, "layers": None},
    "random_reset": {**_RETAIN, "fraction": 0.3, "layers": None, "match": "layers"},
}
METHODS = tuple(DEFAULTS)


def _params(method: str, params: dict, defaults: dict[str, dict] | None = None) -> dict:
    defaults = DEFAULTS if defaults is None else defaults
    if method not in defaults:
        raise ValueError(f"Unknown unlearning method {method!r}; valid methods are {list(defaults)}.")
    unknown = set(params) - set(defaults[method])
    if unknown:
        raise ValueError(f"Unknown parameter(s) {sorted(unknown)} for method {method!r}; its parameters are "
                         f"{defaults[method]} (defaults).")
    out = {**defaults[method], **params}
    for k in ("steps", "batch_size"):
        if k in out and (not isinstance(out[k], int) or out[k] < (0 if k == "steps" else 1)):
            raise ValueError(f"The {k!r} parameter must be an int in [{0 if k == 'steps' else 1}, inf). "
                             f"Got {out[k]!r} instead.")
    for k in ("lr", "beta"):
        if k in out and not (isinstance(out[k], (int, float)) and out[k] > 0):
            raise ValueError(f"The {k!r} parameter must be a number in (0, inf). Got {out[k]!r} instead.")
    if "schedule" in out and out["schedule"] not in ("constant", "cosine"):
        raise ValueError(f"The 'schedule' parameter must be 'constant' or 'cosine'. Got {out['schedule']!r} instead.")
    if "match" in out and out["match"] not in ("global", "layers"):
        raise ValueError(f"The 'match' parameter must be 'global' or 'layers'. Got {out['match']!r} instead.")
    if "fraction" in out and not 0 < out["fraction"] <= 1:
        raise ValueError(f"The 'fraction' parameter must be in (0, 1]. Got {out['fraction']!r} instead.")
    return out


def _stream(task, ids, batch_size: int, seed: int, stream: int) -> Iterator:
    epoch = 0
    while True:
        yield from task.batches(ids, batch_size, seed=seed * 31 + stream, epoch=epoch)
        epoch += 1


def _train_modes(model: nn.Module, trainable: set[str]) -> list[str]:
    """Modules owning a trainable parameter go to train mode, the rest to eval; returns the buffers that may
    change (those of modules in train mode)."""
    model.eval()
    changed = []
    for name, mod in model.named_modules():
        own = [f"{name}.{pn}" if name else pn for pn, _ in mod.named_parameters(recurse=False)]
        if any(k in trainable for k in own):
            mod.train()
            changed += [f"{name}.{bn}" if name else bn for bn, _ in mod.named_buffers(recurse=False)]
    return changed


def _optimize(model, ref, task, forget_ids, retain_ids, p: dict, seed: int, objective: str,
              masks: dict[str, torch.Tensor] | None = None, progress: bool = False) -> dict:
    """``p["steps"]`` Adam steps of an objective; ``masks`` restricts which entries may move (gradient masking;
    parameters without a mask entry are frozen unless ``masks`` is None). Returns the record's ``changed``."""
    from tqdm.auto import tqdm

    names = dict(model.named_parameters())
    trainable = set(names) if masks is None else set(masks)
    for k, prm in names.items():
        prm.requires_grad_(k in trainable)
    buffers = _train_modes(model, trainable)
    opt = torch.optim.Adam([names[k] for k in names if k in trainable], lr=p["lr"])
    fs = _stream(task, forget_ids, p["batch_size"], seed, 1)
    rs = _stream(task, retain_ids, p["batch_size"], seed, 2)
    for step in tqdm(range(p["steps"]), desc=objective, disable=not progress, leave=False):
        if p["schedule"] == "cosine":  # decay to 0 over the steps
            for g in opt.param_groups:
                g["lr"] = p["lr"] * 0.5 * (1 + math.cos(math.pi * step / p["steps"]))
        loss = 0.0
        if objective in ("grad_ascent", "grad_diff", "npo"):
            fb = next(fs)
            lf = task.loss(task.logits(model, fb), fb)
            if objective == "npo":
                with torch.no_grad():
                    lref = task.loss(task.logits(ref, fb), fb)
                # log p - log p_ref = -(lf - lref)
                loss = loss - (2 / p["beta"]) * F.logsigmoid(-p["beta"] * (lref - lf)).mean()
            else:
                loss = loss - p.get("forget_weight", 1.0) * lf.mean()
        if objective != "grad_ascent":
            rb = next(rs)
            logits = task.logits(model, rb)
            loss = loss + p.get("retain_weight", 1.0) * task.loss(logits, rb).mean()
            if p.get("kl_weight", 0.0):
                with torch.no_grad():
                    ref_logits = task.logits(ref, rb)
                loss = loss + p["kl_weight"] * task.kl(logits, ref_logits, rb).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if masks is not None:
            for k, m in masks.items():
                if names[k].grad is not None:
                    names[k].grad.mul_(m)
        opt.step()
    model.eval()
    for prm in names.values():
        prm.requires_grad_(True)
    return {"parameters": sorted(trainable, key=list(names).index),
            "entries": {k: int(masks[k].sum()) if masks is not None else names[k].numel() for k in trainable},
            "buffers": buffers}


def _channel_scores(model, task, forget_ids, units, top_entries: float, batch_size: int) -> torch.Tensor:
    """DEL unit scores ``[units.total]``: per entry ``|theta * sum_forget dL/dtheta|``, per unit the mean of its
    top ``top_entries`` fraction of entries (at least one)."""
    m = copy_model(model).eval().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    for b in task.batches(forget_ids, batch_size):
        task.loss(task.logits(m, b), b).sum().backward()
    mods = dict(m.named_modules())
    scores = torch.zeros(units.total, dtype=torch.float64)
    for li, layer in enumerate(units.layers):
        parts = [(prm.detach() * prm.grad).abs().reshape(prm.shape[0], -1) if prm.grad is not None
                 else torch.zeros(prm.shape[0], prm[0].numel())
                 for sub in units.submodules[layer] for prm in mods[sub].parameters(recurse=False)]
        entries = torch.cat(parts, 1).double()  # [units of the layer, entries per unit]
        k = max(1, int(round(top_entries * entries.shape[1])))
        scores[units.offsets[li]:units.offsets[li] + units.sizes[li]] = entries.topk(k, 1).values.mean(1)
    return scores


def _reset(model: nn.Module, units, chosen: dict[str, list[int]], seed: int) -> None:
    """Overwrite the chosen units' parameters (and normalisation statistics) with a fresh seeded initialisation."""
    mods = dict(model.named_modules())
    for li, layer in enumerate(units.layers):
        idx = chosen.get(layer)
        if not idx:
            continue
        for k, sub in enumerate(units.submodules[layer]):
            fresh = copy.deepcopy(mods[sub]).cpu()  # CPU generator: the same init on any device
            if not hasattr(fresh, "reset_parameters"):
                raise TypeError(f"{sub!r} ({type(fresh).__name__}) has no reset_parameters(); pick layers whose "
                                "submodules can be re-initialised.")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(_generator(seed, 5, li, k).initial_seed()))
                fresh.reset_parameters()
            i = torch.as_tensor(idx)
            with torch.no_grad():
                for (n, t), (_, f) in zip(list(mods[sub].named_parameters(recurse=False)) +
                                          list(mods[sub].named_buffers(recurse=False)),
                                          list(fresh.named_parameters(recurse=False)) +
                                          list(fresh.named_buffers(recurse=False))):
                    if t is not None and t.ndim >= 1 and t.shape[0] == units.sizes[li]:
                        t[i.to(t.device)] = f[i].to(t.device)


def unlearn(model: nn.Module, task, forget_ids, retain_ids, method: str, seed: int = 0, progress: bool = False,
            **params: Any) -> tuple[nn.Module, dict]:
    """Unlearn ``forget_ids`` from a copy of ``model`` with one method (see the module docstring).

    Args:
        model: the trained model; never modified (the method works on a deep copy).
        task: a task (:class:`ClassifierTask` or one with the same protocol).
        forget_ids, retain_ids: example ids (e.g. ``forget_split(data).forget`` / ``.retain``).
        method: one of :data:`METHODS` (or of ``task.defaults``); ``**params`` override its defaults.
        seed: data order, fresh initialisation, random masks and greedy ablation: same seed, same model.
    Returns ``(new_model, record)``: the model in eval mode, and a dict with ``method, params, seed, seconds``
    and ``changed``: ``parameters`` (names that may differ from the input model), ``entries`` (per name, how
    many entries may differ), ``buffers`` (buffer names that may differ), plus method details (``units``).
    """
    p = _params(method, params, getattr(task, "defaults", None))
    forget_ids = np.asarray(forget_ids, dtype=np.int64)
    retain_ids = np.asarray(retain_ids, dtype=np.int64)
    if len(forget_ids) == 0:
        raise ValueError("The forget set is empty; give at least one example id.")
    if np.intersect1d(forget_ids, retain_ids).size:
        raise ValueError("forget_ids and retain_ids overlap; an example is either forgotten or retained.")
    t0 = time.perf_counter()
    new = copy_model(model).eval()
    ref = copy_model(model).eval().requires_grad_(False)
    record: dict[str, Any] = {"method": method, "seed": seed}
    extra = getattr(task, "extra_methods", {})
    if method in extra:
        record.update(extra[method](new, ref, task, forget_ids, retain_ids, p, seed, progress))
    elif method == "zero_units":
        units, record["source"] = p["units"], "given"
        if units is None:
            source = p["source"]
            if source == "auto":
                source = "etd" if getattr(task, "etd", None) is not None else "ablate"
            units = located_units(ref, task, forget_ids, source, p["n_units"], p["n_locate"], seed, p["layers"],
                                  progress)
            record["source"] = source
        units = {k: sorted({int(i) for i in v}) for k, v in units.items()}
        found = _units(new, list(units))
        masks = unit_slices(new, found, units)
        with torch.no_grad():
            for k, prm in new.named_parameters():
                if k in masks:
                    prm[masks[k]] = 0
        record["units"] = units
        record["changed"] = {"parameters": list(masks), "entries": {k: int(m.sum()) for k, m in masks.items()},
                             "buffers": []}
    elif method in ("reset_finetune", "random_reset"):
        from ..models import layer_names

        units = _units(new, p["layers"])
        n = max(1, int(round(p["fraction"] * units.total)))
        if method == "reset_finetune" or p["match"] == "layers":
            scores = _channel_scores(ref, task, forget_ids, units, p.get("top_entries", 0.1), p["batch_size"])
            pick = torch.argsort(scores, descending=True, stable=True)[:n]
        if method == "random_reset":
            g = _generator(seed, 11)
            if p["match"] == "layers":  # as many random units in each layer as the localized mask has there
                off = torch.as_tensor(units.offsets)
                layer_of = torch.searchsorted(off, pick, right=True) - 1
                pick = torch.cat([off[li] + torch.randperm(units.sizes[li], generator=g)[:int((layer_of == li).sum())]
                                  for li in range(len(units.layers))])
            else:
                pick = torch.randperm(units.total, generator=g)[:n]
        chosen: dict[str, list[int]] = {}
        for j in sorted(pick.tolist()):
            layer, i = units.name(j)
            chosen.setdefault(layer, []).append(i)
        _reset(new, units, chosen, seed)
        masks = unit_slices(new, units, chosen)
        head = layer_names(new, head=True)[-1]
        for k, prm in new.named_parameters():
            if k.startswith(head + "."):
                masks[k] = torch.ones_like(prm, dtype=torch.bool)
        record["units"] = chosen
        record["head"] = head
        record["changed"] = _optimize(new, ref, task, forget_ids, retain_ids, p, seed, "finetune", masks, progress)
        reset_buffers = [f"{s}.{b}" for layer in chosen for s in units.submodules[layer]
                         for b, _ in dict(new.named_modules())[s].named_buffers(recurse=False)]
        record["changed"]["buffers"] = sorted(set(record["changed"]["buffers"]) | set(reset_buffers))
    else:
        record["changed"] = _optimize(new, ref, task, forget_ids, retain_ids, p, seed, method, None, progress)
    record["params"] = p
    record["seconds"] = round(time.perf_counter() - t0, 3)
    return new.eval(), json.loads(json.dumps(record))


# ----------------------------------------------------------------------------------------------- evaluation

RELEARN_DEFAULTS = {"steps": 20, "lr": 1e-3, "batch_size": 32, "fraction": 0.5}
"""The relearning attack: Adam steps, learning rate, batch size, and the share of the forget set relearned."""


def relearn(model, task, ids, steps: int = 20, lr: float = 1e-3, batch_size: int = 32, seed: int = 0):
    """The relearning attack: a copy of ``model`` fine-tuned for ``steps`` Adam steps on the examples ``ids``
    of ``task`` (its ordinary training loss). ``model`` itself is not modified."""
    from ..validate import number

    number("steps", steps, lo=1, integer=True)
    number("lr", lr, lo=0.0, lo_open=True)
    number("batch_size", batch_size, lo=1, integer=True)
    ids = np.asarray(ids)
    if len(ids) == 0:
        raise ValueError("The relearning attack needs at least one example to relearn on.")
    m = copy_model(model).eval()
    _optimize(m, None, task, np.asarray([], dtype=ids.dtype), ids,
              {"steps": steps, "lr": lr, "batch_size": batch_size, "schedule": "constant"}, seed, "relearn")
    return m


def relearn_sets(forget_ids, retain_ids, fraction: float, seed: int = 0) -> dict[str, np.ndarray]:
    """``relearn`` (a seeded ``fraction`` of the forget set), ``held`` (the rest of it: what the attack did not
    show the model) and ``retain`` (as many retain examples, the "related data" attack)."""
    from ..validate import number

    number("fraction", fraction, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    rng = np.random.default_rng(seed + 7)
    f = np.asarray(forget_ids)
    perm = rng.permutation(len(f))
    k = max(1, min(len(f) - 1, int(round(fraction * len(f)))))
    r = np.asarray(retain_ids)
    return {"relearn": f[perm[:k]], "held": f[perm[k:]], "retain": r[rng.permutation(len(r))[:k]]}


def relearn_row(model, task, split, attack: dict, seed: int = 0) -> dict:
    """The relearning attack (``attack``: overrides of :data:`RELEARN_DEFAULTS`) on one model, as table columns: ``relearn_forget_acc_held`` (training-label
    accuracy on the forget examples the attack did not relearn, after relearning the others),
    ``relearn_forget_acc`` (on all of the forget set), ``retain_relearn_forget_acc`` (after fine-tuning on as many
    retain examples instead), ``forget_acc_held_before`` (the same held examples before any attack)."""
    p = {**RELEARN_DEFAULTS, **attack}
    sets = relearn_sets(split.forget, split.retain, p["fraction"], seed)
    kw = {k: p[k] for k in ("steps", "lr", "batch_size")}
    a = relearn(model, task, sets["relearn"], seed=seed, **kw)
    b = relearn(model, task, sets["retain"], seed=seed, **kw)
    return {"forget_acc_held_before": float(task.per_example(model, sets["held"]).acc.mean()),
            "relearn_forget_acc_held": float(task.per_example(a, sets["held"]).acc.mean()),
            "relearn_forget_acc": float(task.per_example(a, split.forget).acc.mean()),
            "retain_relearn_forget_acc": float(task.per_example(b, split.forget).acc.mean())}


def mia_auc(member_losses, nonmember_losses) -> float:
    """AUC of the loss attack (low loss = member) telling members from non-members (0.5 = cannot tell)."""
    from ..analyses.privacy import roc_summary

    s = -np.concatenate([np.asarray(member_losses, float), np.asarray(nonmember_losses, float)])
    y = np.r_[np.ones(len(member_losses), bool), np.zeros(len(nonmember_losses), bool)]
    return roc_summary(s, y)["auc"]


def forget_quality(losses, oracle_losses) -> tuple[float, float]:
    """Two-sample KS test of per-example forget losses against the oracle's: ``(statistic, p-value)``; a high
    p-value means the two cannot be told apart."""
    from scipy.stats import ks_2samp

    r = ks_2samp(np.asarray(losses, float), np.asarray(oracle_losses, float))
    return float(r.statistic), float(r.pvalue)


def _holdout_task(task: ClassifierTask, split: Split, seed: int) -> ClassifierTask:
    """The task with test labels flipped (uniformly to a wrong class) at the forget set's flip rate."""
    d = task.data
    f = task.batch(split.forget)
    rate = float((f["y"] != f["original_label"]).float().mean())
    pos = np.flatnonzero(np.isin(d.example_id.numpy(), split.holdout))
    rng = np.random.default_rng(seed)
    flip = rng.choice(pos, size=int(round(rate * len(pos))), replace=False)
    y = d.y.clone()
    y[torch.as_tensor(flip)] = (y[torch.as_tensor(flip)] + torch.as_tensor(rng.integers(1, d.num_classes, len(flip)))
                                ) % d.num_classes
    return ClassifierTask(replace(d, y=y), task.etd, task.etd_mode, task.eval_batch_size, task.device)


def evaluate_unlearning(model: nn.Module, task: ClassifierTask, split: Split, oracle_forget_losses=None,
                        seed: int = 0) -> dict:
    """One table row: ``forget_acc`` (training = flipped labels), ``forget_acc_original``, ``retain_acc``,
    ``test_acc``, ``forget_loss`` (mean), ``mia_auc`` (forget vs test examples with labels flipped at the
    forget set's rate), and with the oracle's per-example forget losses ``ks_stat, ks_p``."""
    f = task.per_example(model, split.forget)
    r = task.per_example(model, split.retain)
    t = task.per_example(model, split.holdout)
    h = _holdout_task(task, split, seed).per_example(model, split.holdout)
    row = {"forget_acc": float(f.acc.mean()), "forget_acc_original": float(f.acc_original.mean()),
           "retain_acc": float(r.acc.mean()), "test_acc": float(t.acc.mean()), "forget_loss": float(f.loss.mean()),
           "mia_auc": mia_auc(f.loss, h.loss)}
    if oracle_forget_losses is not None:
        row["ks_stat"], row["ks_p"] = forget_quality(f.loss, oracle_forget_losses)
    row["_forget_losses"] = f.loss.to_numpy()
    return row


def _row_frame(name: str, row: dict, settings: dict) -> pd.DataFrame:
    df = pd.DataFrame([{"method": name, **{k: v for k, v in row.items() if not k.startswith("_")}}])
    return make_result(df, **settings)


def compare_unlearning(run, forget: str | Sequence[int] = "noisy", methods: Sequence[str] | None = None,
                       out: str | Path | None = None, seed: int = 0, params: dict[str, dict] | None = None,
                       progress: bool = True, relearn: dict | None = None) -> pd.DataFrame:
    """Every method on a finished run against the oracle: one row per method plus ``original`` and ``oracle``.

    Args:
        run: a finished :class:`~memloc.train.Run`.
        forget: ``"noisy"`` or training example ids (:func:`forget_split`).
        methods: names from :data:`METHODS` (default all).
        out: folder (default ``RUN/unlearn``); everything goes to ``out/<split name>/``: ``oracle/`` (the
            retrained run), ``rows/<method>.parquet`` (one per method, written atomically and reused when its
            settings match), ``table.parquet`` and ``tradeoff.png``.
        params: ``{method: {param: value}}`` overriding :data:`DEFAULTS`.
        relearn: run the relearning attack on every row (``{}`` for :data:`RELEARN_DEFAULTS`, or overrides of
            ``steps, lr, batch_size, fraction``): adds the columns of :func:`relearn_row`.
    Returns the table (columns ``method, forget_acc, forget_acc_original, retain_acc, test_acc, forget_loss,
    mia_auc, ks_stat, ks_p, ks_can_tell, changed_entries, steps, seconds``) with the settings in ``attrs``;
    ``steps`` are optimiser steps (the oracle's: its epochs x batches per epoch, for the cost comparison).
    """
    from tqdm.auto import tqdm

    if not run.finished:
        raise ValueError(f"{run.path} is not finished; rerun its `memloc train` command first.")
    methods = list(METHODS) if methods is None else list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"Unknown unlearning method(s) {bad}; valid methods are {list(METHODS)} (or 'all').")
    params = params or {}
    for m in params:
        if m not in methods:
            raise ValueError(f"Parameters given for {m!r}, which is not among the methods {methods}.")
    effective = {m: _params(m, params.get(m, {})) for m in methods}
    data = run.data()
    task = ClassifierTask(data, etd=run.etd(), device=run.device)
    split = forget_split(data, forget)
    folder = Path(out or run.path / "unlearn") / split.name
    from ..validate import mark_output
    mark_output(folder.parent, "unlearn")
    oracle_run = train_oracle(run, split.forget, folder / "oracle", progress=progress)
    original, oracle = run.model(), oracle_run.model()
    base = {"run": str(run.path), "config": run.config.to_dict(), "forget": split.name,
            "n_forget": int(len(split.forget)), "n_retain": int(len(split.retain)),
            "n_holdout": int(len(split.holdout)), "oracle": str(oracle_run.path),
            "oracle_epochs": oracle_run.summary["epochs"], "seed": seed,
            "mia": "loss attack, forget vs test examples with labels flipped at the forget set's rate",
            "forget_quality": "two-sample KS test of per-example forget losses vs the oracle's",
            "relearn": None if relearn is None else {**RELEARN_DEFAULTS, **relearn}}
    o = evaluate_unlearning(oracle, task, split, seed=seed)
    orig = evaluate_unlearning(original, task, split, o["_forget_losses"], seed=seed)
    if relearn is not None:
        o.update(relearn_row(oracle, task, split, relearn, seed))
        orig.update(relearn_row(original, task, split, relearn, seed))
    o["ks_stat"], o["ks_p"] = 0.0, 1.0
    can_tell = orig["ks_p"] < 0.05
    oracle_steps = oracle_run.summary["epochs"] * math.ceil(len(split.retain) / run.config.batch_size)
    rows = [_row_frame("original", {**orig, "changed_entries": 0, "steps": 0, "seconds": 0.0}, base),
            _row_frame("oracle", {**o, "changed_entries": np.nan, "steps": oracle_steps,
                                  "seconds": float(oracle_run.summary["seconds"])}, base)]
    for m in tqdm(methods, desc="unlearn", disable=not progress):
        path = folder / "rows" / f"{m}.parquet"
        settings = {**base, "method": m, "params": effective[m]}
        if path.exists():  # reuse a finished row made with the same parameters, seed and oracle
            old = load_result(path)
            same = {k: old.attrs["settings"].get(k) for k in ("params", "seed", "oracle", "relearn")}
            if same == json.loads(json.dumps({"params": effective[m], "seed": seed, "oracle": base["oracle"],
                                              "relearn": base["relearn"]})):
                rows.append(old)
                continue
        new, rec = unlearn(original, task, split.forget, split.retain, m, seed=seed, progress=progress,
                           **params.get(m, {}))
        row = evaluate_unlearning(new, task, split, o["_forget_losses"], seed=seed)
        if relearn is not None:
            row.update(relearn_row(new, task, split, relearn, seed))
        row["changed_entries"] = int(sum(rec["changed"]["entries"].values()))
        row["steps"] = int(rec["params"].get("steps", 0))
        row["seconds"] = rec["seconds"]
        df = _row_frame(m, row, {**settings, "record": rec})
        save_result(df, path)
        rows.append(df)
    table = pd.concat(rows, ignore_index=True)
    table["ks_can_tell"] = can_tell
    table = make_result(table, **base, ks_power_p=orig["ks_p"], ks_can_tell=bool(can_tell),
                        params={m: effective[m] for m in methods}, methods=methods)
    save_result(table, folder / "table.parquet")
    from ..analyses.plots import save_figure
    save_figure(plot_tradeoff(table), folder / "tradeoff.png")
    return table


def plot_tradeoff(table: pd.DataFrame):
    """The forget/utility trade-off of a :func:`compare_unlearning` table: forget accuracy (training = flipped
    labels) against retain and against test accuracy, and the membership AUC against test accuracy (forget
    accuracy saturates near the oracle's; the AUC still shows what is left). The original and the oracle are
    marked; the run, seeds and each method's parameters are printed in the title."""
    import textwrap

    import matplotlib.pyplot as plt

    s = table.attrs.get("settings", {})
    cfg = s.get("config", {})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    marks = "ovD^<>phX8P"
    for k, (_, r) in enumerate(table.iterrows()):
        style = {"original": dict(marker="s", color="black", s=70), "oracle": dict(
            marker="*", color="gold", edgecolor="black", s=260)}.get(r.method, dict(marker=marks[k % len(marks)], s=60))
        for ax, (x, y) in zip(axes, [("forget_acc", "retain_acc"), ("forget_acc", "test_acc"), ("mia_auc", "test_acc")]):
            ax.scatter(r[x], r[y], label=r.method, zorder=3, alpha=0.85, **style)
    for ax, (x, y) in zip(axes, [("forget_acc", "retain_acc"), ("forget_acc", "test_acc"), ("mia_auc", "test_acc")]):
        xl = {"forget_acc": "forget accuracy (flipped labels; lower = forgotten)",
              "mia_auc": "membership AUC, forget vs held-out (oracle ~0.5)"}[x]
        ax.set(xlabel=xl, ylabel=y.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="best")
    params = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in p.items() if v is not None and k not in (
        "schedule", "layers", "units")) for m, p in s.get("params", {}).items())
    fig.suptitle(f"Unlearning {s.get('n_forget', '?')} examples ({s.get('forget', '?')}) of "
                 f"{cfg.get('model', '?')} on {cfg.get('dataset', '?')}, {cfg.get('noise', 0):.0%} flipped, "
                 f"seed {cfg.get('seed', '?')}; oracle retrained without them ({s.get('oracle_epochs', '?')} epochs); "
                 f"method seed {s.get('seed', '?')}; KS power p = {s.get('ks_power_p', float('nan')):.2g}\n"
                 + textwrap.fill(params, 230), fontsize=7)
    return fig
