"""Greedy neuron ablation: how many units must be zeroed to flip an example's prediction (Maini et al. 2023).

For a target example t with training label y_t (the flipped label if t is noisy) and a batch B_t of other,
randomly drawn training examples, repeat:

1. predict t (optionally averaging logits over ``noise_samples`` Gaussian perturbations of the inputs); stop if
   the prediction is no longer y_t, or if ``max_units`` units are already zeroed (reported as ``capped``);
2. objective ``L_t = -CE_t + keep_weight * mean_{i in B_t} CE_i`` (raise t's loss, keep the batch fitted);
3. score every unit u by the first-order gain of zeroing it, ``sum_{p in u} p * dL_t/dp``: the unit's
   parameters are the slices, along the output dimension, of every parametrised submodule of its layer (the
   output neuron's weight row and bias of a linear layer; the output channel's kernel, bias and BatchNorm
   scale and shift of a conv block);
4. zero the best-scoring unit not yet zeroed.

**Batched path.** For a linear map the sum ``sum_{p in u} p * dL/dp`` equals ``sum_rows z_u * dL/dz_u`` where z
is the submodule's output (Euler's identity for functions homogeneous in the unit's parameters), so one
forward/backward over the stacked batches of many targets, with a per-row mask over units, gives every target's
unit scores at once; zeroing a unit's parameters equals masking its outputs. :func:`greedy_flip` with
``method="loop"`` is the straightforward reference (one target at a time, parameters really zeroed), and the
two pick the same units (``tests/test_ablate.py``).

Avoided reference bugs: a fresh, per-target random batch (the reference reused one loader batch for all
targets), a cap on iterations (the reference could loop forever when no unit scored positive), noise
generators private to each target (no global reseeding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import Dataset
from ..hooks import SiteError, hooks, model_device, replace_parameters, require_eval
from ..results import make_result
from ._common import resolve_layers, seeded_generator
from ..validate import UnknownKeyError


@dataclass
class Units:
    """The ablatable units of a model: ``layers[i]`` has ``sizes[i]`` units, global ids from ``offsets[i]``."""

    layers: list[str]
    sizes: list[int]
    offsets: list[int]
    submodules: dict[str, list[str]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.offsets[-1] + self.sizes[-1] if self.layers else 0

    def name(self, j: int) -> tuple[str, int]:
        i = int(np.searchsorted(self.offsets, j, side="right") - 1)
        return self.layers[i], int(j - self.offsets[i])


def find_units(model: nn.Module, layers: str | Sequence[str] | None = None) -> Units:
    """Units of the given layers (default: ``layer_names(model)``, the head excluded).

    A layer's units are the output features/channels shared by all its parametrised submodules; every
    parameter's first dimension must be that count (true for Linear, ConvNd, BatchNorm, LayerNorm blocks).
    """
    layers = resolve_layers(model, layers)
    mods = dict(model.named_modules())
    sizes, subs = [], {}
    for layer in layers:
        owners = [(n, m) for n, m in mods.items()
                  if (n == layer or n.startswith(layer + ".")) and any(True for _ in m.parameters(recurse=False))]
        dims = {p.shape[0] for _, m in owners for p in m.parameters(recurse=False)}
        if len(dims) != 1:
            raise SiteError(f"Layer {layer!r} mixes parameter output sizes {sorted(dims)}; greedy ablation needs "
                            "layers whose parametrised submodules share one output size (pick a sub-layer, e.g. "
                            f"one of {[n for n, _ in owners]}).")
        sizes.append(dims.pop())
        subs[layer] = [n for n, _ in owners]
    offsets = list(np.cumsum([0] + sizes[:-1]).astype(int)) if sizes else []
    return Units(layers, sizes, offsets, subs)


def unit_slices(model: nn.Module, units: Units, chosen: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """``{parameter name: bool mask}`` of the parameter entries that belong to the chosen units of each layer (the
    slices along the output dimension of every parametrised submodule of the layer, as :func:`find_units` counts
    them); layers with no chosen unit are left out."""
    params = dict(model.named_parameters())
    mods = dict(model.named_modules())
    out = {}
    for layer, idx in chosen.items():
        if not idx:
            continue
        for sub in units.submodules[layer]:
            for pn, p in mods[sub].named_parameters(recurse=False):
                m = torch.zeros_like(p, dtype=torch.bool)
                m[torch.as_tensor(idx)] = True
                out[f"{sub}.{pn}" if sub else pn] = m
    assert set(out) <= set(params)
    return out


def _other_rows(seed: int, example_id: int, target_pos: int, n_train: int, m: int) -> torch.Tensor:
    """Positions (in the train split) of the m other examples drawn for this target; fixed per (seed, id)."""
    perm = torch.randperm(n_train - 1, generator=seeded_generator(seed, 1, example_id))[:m]
    return perm + (perm >= target_pos).long()  # skip the target itself


def _noise(x: torch.Tensor, k: int, scale: float, seed: int, example_id: int, step: int) -> torch.Tensor:
    """``[k, *x.shape]`` Gaussian perturbations with per-example norm ``scale * ||x_i||``."""
    g = seeded_generator(seed, 2, example_id, step)
    eps = torch.randn((k, *x.shape), generator=g, dtype=x.dtype)
    flat = eps.flatten(2)
    norms = x.flatten(1).norm(dim=1).clamp_min(1e-12)
    flat = flat / flat.norm(dim=2, keepdim=True).clamp_min(1e-12) * (scale * norms)[None, :, None]
    return flat.view_as(eps)


def _masked_forward(model: nn.Module, units: Units, keep: torch.Tensor, x: torch.Tensor, store: dict | None,
                    reps: int = 1):
    """Forward with per-row unit masks ``keep [R, U]`` (rows of ``x`` are ``reps`` stacked copies of R rows).

    A masked unit's channel is zeroed at the output of *every* parametrised submodule of its layer: that is
    exactly what zeroing all its parameters does (a conv or linear map with zero weights and bias outputs zero,
    a BatchNorm with zero scale and shift too), also in blocks with parallel branches (a projection shortcut).
    Layers with no masked unit are not touched. With ``store``, every parametrised submodule's output is kept
    (with its gradient) for scoring.
    """
    fns = {}
    for li, layer in enumerate(units.layers):
        sl = keep[:, units.offsets[li]:units.offsets[li] + units.sizes[li]]
        masked = not bool(sl.all())
        mask = sl.to(device=x.device, dtype=x.dtype) if masked else None
        for sub in units.submodules[layer]:
            if not (store is not None or masked):
                continue

            def fn(out, mask=mask, layer=layer):
                if mask is not None:
                    mk = mask.repeat(reps, 1) if reps > 1 else mask
                    out = out * mk.view(mk.shape + (1,) * (out.ndim - 2))
                if store is not None:
                    if out.requires_grad:
                        out.retain_grad()
                    else:  # parameters are frozen in the batched search: start the graph here
                        out = out.detach().requires_grad_(True)
                    store.setdefault(layer, []).append(out)
                return out
            fns[sub] = fn
    if not fns:
        return model(x)
    with hooks(model, fns):
        return model(x)


def _rows_for(train: Dataset, pos: list[int], ids: list[int], m: int, seed: int):
    xs, ys = [], []
    for p, eid in zip(pos, ids):
        others = _other_rows(seed, eid, p, len(train), m)
        rows = torch.cat([torch.tensor([p]), others])
        xs.append(train.x[rows])
        ys.append(train.y[rows])
    return torch.cat(xs), torch.cat(ys)


def _batched_search(model, units, train, pos, ids, y_t, *, m, keep_weight, noise_samples, noise_scale, max_units,
                    seed, max_rows, progress):
    T, U = len(pos), units.total
    keep = torch.ones(T, U, dtype=torch.bool)
    zeroed: list[list[int]] = [[] for _ in range(T)]
    done = torch.zeros(T, dtype=torch.bool)
    flipped = torch.zeros(T, dtype=torch.bool)
    final_pred = torch.full((T,), -1, dtype=torch.long)
    bar = tqdm(total=T, desc="greedy ablation", disable=not progress, leave=False)
    rows_done = 0
    dev = model_device(model)
    x_all, y_all = _rows_for(train, pos, ids, m, seed)  # on the CPU: noise is drawn from them there
    x_dev, y_dev = x_all.to(dev), y_all.to(dev)
    rows_per = m + 1
    step = 0
    while not done.all():
        active = torch.nonzero(~done).flatten()
        per_pass = max(1, max_rows // (rows_per * max(1, noise_samples)))
        for chunk in active.split(per_pass):
            rows = (chunk[:, None] * rows_per + torch.arange(rows_per)).flatten()
            x, y = x_dev[rows.to(dev)], y_dev[rows.to(dev)]
            krow = keep[chunk].repeat_interleave(rows_per, 0)
            if noise_samples:
                xc = x_all[rows]
                eps = torch.cat([_noise(xc[j * rows_per:(j + 1) * rows_per], noise_samples, noise_scale, seed,
                                        ids[int(t)], step) for j, t in enumerate(chunk)], dim=1)
                xin = (x[None] + eps.to(dev)).flatten(0, 1)
            else:
                xin = x
            store: dict = {}
            rows_done += len(xin)
            logits = _masked_forward(model, units, krow, xin, store, reps=max(1, noise_samples))
            if noise_samples:
                logits = logits.view(noise_samples, len(x), -1).mean(0)
            tgt = logits[::rows_per]
            pred = tgt.argmax(1).cpu()
            n_zeroed = torch.tensor([len(zeroed[int(t)]) for t in chunk])
            stop = (pred != y_t[chunk]) | (n_zeroed >= max_units)
            for j, t in enumerate(chunk.tolist()):
                if stop[j]:
                    done[t], flipped[t], final_pred[t] = True, bool(pred[j] != y_t[t]), int(pred[j])
                    bar.update(1)
            if stop.all():
                continue
            ce = F.cross_entropy(logits, y, reduction="none")
            w = torch.full((len(chunk), rows_per), keep_weight / max(m, 1), dtype=ce.dtype)
            w[:, 0] = -1.0
            w[stop] = 0.0
            w = w.to(dev)
            model.zero_grad(set_to_none=True)
            (ce * w.flatten()).sum().backward()
            scores = torch.zeros(len(chunk), U, dtype=torch.float64)
            for li, layer in enumerate(units.layers):
                acc = 0
                for z in store[layer]:
                    s = (z * z.grad)
                    s = s.flatten(2).sum(2) if s.ndim > 2 else s
                    if noise_samples:
                        s = s.view(noise_samples, len(x), -1).sum(0)
                    acc = acc + s.double()
                per_target = acc.view(len(chunk), rows_per, -1).sum(1).cpu()
                scores[:, units.offsets[li]:units.offsets[li] + units.sizes[li]] = per_target
            scores[~keep[chunk]] = -torch.inf
            best = scores.argmax(1)
            for j, t in enumerate(chunk.tolist()):
                if not stop[j]:
                    keep[t, best[j]] = False
                    zeroed[t].append(int(best[j]))
        step += 1
    bar.close()
    return zeroed, flipped, final_pred, keep, rows_done




def _loop_search(model, units, train, pos, ids, y_t, *, m, keep_weight, noise_samples, noise_scale, max_units,
                 seed, progress):
    """Reference: one target at a time, units zeroed in the real parameters, scores from parameter gradients."""
    mods = dict(model.named_modules())
    params = {layer: [(f"{sub}.{pn}" if sub else pn, p) for sub in units.submodules[layer]
                      for pn, p in mods[sub].named_parameters(recurse=False)] for layer in units.layers}
    zeroed_all, flipped_all, preds = [], [], []
    dev = model_device(model)
    for t in tqdm(range(len(pos)), desc="greedy ablation (loop)", disable=not progress, leave=False):
        xc, y = _rows_for(train, [pos[t]], [ids[t]], m, seed)
        x, y = xc.to(dev), y.to(dev)
        zeroed: list[int] = []
        step = 0
        while True:
            values = {}
            for j in zeroed:
                layer, idx = units.name(j)
                for name, p in params[layer]:
                    v = values.get(name, p.detach().clone())
                    v[idx] = 0
                    values[name] = v
            with replace_parameters(model, values):
                xin = x
                if noise_samples:
                    xin = (x[None] + _noise(xc, noise_samples, noise_scale, seed, ids[t], step).to(dev)).flatten(0, 1)
                logits = model(xin)
                if noise_samples:
                    logits = logits.view(noise_samples, len(x), -1).mean(0)
                pred = int(logits[0].argmax())
                if pred != int(y_t[t]) or len(zeroed) >= max_units:
                    break
                ce = F.cross_entropy(logits, y, reduction="none")
                loss = -ce[0] + (keep_weight * ce[1:].mean() if m else 0.0)
                model.zero_grad(set_to_none=True)
                loss.backward()
                scores = torch.zeros(units.total, dtype=torch.float64)
                for li, layer in enumerate(units.layers):
                    s = 0
                    for _, p in params[layer]:
                        s = s + (p.detach() * p.grad).flatten(1).sum(1).double() if p.ndim > 1 else \
                            s + (p.detach() * p.grad).double()
                    scores[units.offsets[li]:units.offsets[li] + units.sizes[li]] = s.cpu()
            scores[zeroed] = -torch.inf
            zeroed.append(int(scores.argmax()))
            step += 1
        zeroed_all.append(zeroed)
        flipped_all.append(pred != int(y_t[t]))
        preds.append(pred)
    model.zero_grad(set_to_none=True)
    return zeroed_all, torch.tensor(flipped_all), torch.tensor(preds)


def _accuracy_changes(model, units, keep, data, eval_size, seed, max_rows):
    """Clean- and test-accuracy change caused by each target's zeroed units (``keep [T, U]``).

    Targets that zeroed the same set of units share one evaluation.
    """
    keep, inverse = torch.unique(keep, dim=0, return_inverse=True)
    dev = model_device(model)
    out = {}
    for group in ("clean", "test"):
        sub = data.subset(data.group == group)
        if len(sub) == 0 or eval_size == 0:
            out[group] = np.full(len(inverse), np.nan)
            continue
        if eval_size is not None and len(sub) > eval_size:
            sub = sub.subset(torch.randperm(len(sub), generator=seeded_generator(seed, 3))[:eval_size].sort().values)
        sx, sy = sub.x.to(dev), sub.y.to(dev)
        with torch.no_grad():
            base = (model(sx).argmax(1) == sy).double().mean().cpu()
            per = max(1, max_rows // max(1, len(sub)))
            accs = []
            for chunk in torch.arange(len(keep)).split(per):
                krow = keep[chunk].repeat_interleave(len(sub), 0)
                logits = _masked_forward(model, units, krow, sx.repeat(len(chunk), *[1] * (sx.ndim - 1)), None)
                accs.append((logits.argmax(1) == sy.repeat(len(chunk))).view(len(chunk), -1).double().mean(1).cpu())
        out[group] = (torch.cat(accs) - base)[inverse].numpy()
    return out


def greedy_flip(model: nn.Module, data: Dataset, example_ids: Sequence[int], *, layers: Sequence[str] | None = None,
                batch_size: int = 64, keep_weight: float = 1.0, noise_samples: int = 0, noise_scale: float = 0.01,
                max_units: int = 64, eval_size: int | None = 1000, seed: int = 0, method: str = "batched",
                max_rows: int = 2048, progress: bool = True) -> pd.DataFrame:
    """Greedily zero units until each target example's prediction flips away from its training label.

    Args:
        model: an eval-mode classifier (``[B, ...] -> [B, K]`` logits).
        data: the Dataset it was trained on (training labels in ``data.y``; groups for the report).
        example_ids: ids of the training examples to flip.
        layers: layers whose units may be zeroed (default ``layer_names(model)``: every layer but the head, whose
            units are class logits; zeroing one flips any example and locates nothing. Pass the head's name to
            include it).
        batch_size: size of each target's batch: the target plus ``batch_size - 1`` other training examples,
            drawn at random per target (seeded by ``seed`` and the example id).
        keep_weight: weight of the batch term (0 = only raise the target's loss).
        noise_samples, noise_scale: average logits over this many Gaussian input perturbations of norm
            ``noise_scale * ||x||`` (0 = off; the reference used 5 samples at 1%).
        max_units: cap on zeroed units per example; examples that reach it are reported ``capped``.
        eval_size: clean and test examples (random subsets of this size; ``None`` = all) on which the accuracy
            change caused by each example's units is measured; 0 skips that measurement (NaN).
        method: ``"batched"`` (many targets per forward pass, per-row masks) or ``"loop"`` (the reference).
        max_rows: rows (targets x batch x noise samples) per forward/backward pass: the memory knob. On a CPU
            ~2048 is fastest (larger passes fall out of cache); on a GPU raise it.
    Returns a result, one row per example: ``example_id, group, label, n_units, flipped, capped,
    final_prediction, units`` (list of ``"layer:index"``), ``unit_layers`` (list of layer names),
    ``clean_acc_change, test_acc_change``. The model is left exactly as it was.
    """
    from ..validate import number

    require_eval(model, "Greedy ablation")
    number("keep_weight", keep_weight, lo=0)
    number("noise_scale", noise_scale, lo=0)
    number("eval_size", eval_size, lo=0, integer=True, none_ok=True)
    for name, val, lo in [("batch_size", batch_size, 1), ("max_units", max_units, 1), ("noise_samples", noise_samples, 0),
                          ("max_rows", max_rows, 1)]:
        if not isinstance(val, int) or val < lo:
            raise ValueError(f"The {name!r} parameter must be an int in [{lo}, inf). Got {val!r} instead.")
    if method not in ("batched", "loop"):
        raise ValueError(f"The 'method' parameter must be 'batched' or 'loop'. Got {method!r} instead.")
    units = find_units(model, layers)
    train = data.train
    id_to_pos = pd.Series(np.arange(len(train)), index=train.example_id.numpy())
    ids = [int(i) for i in np.asarray(example_ids).reshape(-1)]
    bad = [i for i in ids if i not in id_to_pos.index]
    if bad:
        raise UnknownKeyError(f"Example id(s) {bad[:10]} are not training examples of this dataset.")
    if not ids:
        raise ValueError("No example ids given.")
    pos = [int(id_to_pos[i]) for i in ids]
    y_t = train.y[pos]
    m = min(batch_size - 1, len(train) - 1)
    kw = dict(m=m, keep_weight=keep_weight, noise_samples=noise_samples, noise_scale=noise_scale,
              max_units=max_units, seed=seed)
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        # the loop needs parameter gradients; the batched path only activation gradients (weight gradients
        # would cost as much as the forward pass and go unused)
        p.requires_grad_(method == "loop")
    try:
        if method == "batched":
            zeroed, flipped, final_pred, keep, rows_done = _batched_search(model, units, train, pos, ids, y_t,
                                                                max_rows=max_rows, progress=progress, **kw)
        else:
            zeroed, flipped, final_pred = _loop_search(model, units, train, pos, ids, y_t, progress=progress, **kw)
            rows_done = None
            keep = torch.ones(len(ids), units.total, dtype=torch.bool)
            for t, z in enumerate(zeroed):
                keep[t, z] = False
        changes = _accuracy_changes(model, units, keep, data, eval_size, seed, max_rows)
    finally:
        model.zero_grad(set_to_none=True)
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    names = [[units.name(j) for j in z] for z in zeroed]
    df = pd.DataFrame({
        "example_id": ids,
        "group": train.group[pos].astype(str),
        "label": y_t.numpy(),
        "n_units": [len(z) for z in zeroed],
        "flipped": flipped.numpy().astype(bool),
        "capped": [not bool(f) for f in flipped],
        "final_prediction": final_pred.numpy(),
        "units": [[f"{layer}:{i}" for layer, i in n] for n in names],
        "unit_layers": [[layer for layer, _ in n] for n in names],
        "clean_acc_change": changes["clean"],
        "test_acc_change": changes["test"],
    })
    return make_result(df, method="greedy_flip", implementation=method, layers=units.layers,
                       units_per_layer=dict(zip(units.layers, units.sizes)), batch_size=batch_size,
                       keep_weight=keep_weight, noise_samples=noise_samples, noise_scale=noise_scale,
                       max_units=max_units, eval_size=eval_size, seed=seed, search_rows=rows_done)


def ablate_examples(run, n_per_group: int = 100, groups: Sequence[str] = ("clean", "noisy"), seed: int = 0,
                    **kwargs) -> pd.DataFrame:
    """:func:`greedy_flip` on ``n_per_group`` random examples of each group of a finished run's final model.

    Only examples the model fits (predicts with their training label) are drawn: an example it never fit has
    nothing to flip, and counting it as "0 units" would report a finding that is not there. How many were left
    out per group is in the settings (``unfit_excluded``) and a warning. Settings add the run path and its config,
    so the numbers can be rerun.
    """
    import warnings

    from ..train import evaluate
    from ..validate import ConfigError, number

    number("n_per_group", n_per_group, lo=1, integer=True)
    if isinstance(groups, str) or not groups or any(g not in ("clean", "noisy") for g in groups):
        raise ConfigError("The 'groups' parameter must list 'clean' and/or 'noisy' (greedy ablation flips training "
                          f"examples). Got {groups!r} instead.")
    model = run.model()
    data = run.data()
    fit = evaluate(model, data.train, progress=False)
    fit_ids = set(fit.example_id[fit.correct].tolist())
    rng = np.random.default_rng(seed)
    ids, excluded = [], {}
    for g in groups:
        pool = data.example_id.numpy()[data.group == g]
        keep = np.array([i for i in pool if int(i) in fit_ids], dtype=np.int64)
        excluded[g] = int(len(pool) - len(keep))
        if len(keep):
            ids += sorted(rng.choice(keep, size=min(n_per_group, len(keep)), replace=False).tolist())
    if any(excluded.values()):
        warnings.warn(f"Greedy ablation left out examples the model does not fit (nothing to flip): "
                      f"{', '.join(f'{n} {g}' for g, n in excluded.items() if n)}.", stacklevel=2)
    if not ids:
        raise ValueError(f"The model of {run.path} fits none of the {'/'.join(groups)} examples, so there is nothing "
                         "to flip; train it longer (e.g. until it fits its flipped labels).")
    df = greedy_flip(model, data, ids, seed=seed, **kwargs)
    return make_result(df, run=str(run.path), n_per_group=n_per_group, unfit_excluded=excluded,
                       config=run.config.to_dict())


def summarize_flips(df: pd.DataFrame) -> dict:
    """Medians of units-to-flip for noisy vs clean examples, a one-sided Mann-Whitney test (noisy < clean)
    and the mean accuracy changes; capped examples count with their cap (a lower bound)."""
    from scipy.stats import mannwhitneyu

    out = {}
    for g in ("clean", "noisy"):
        sub = df[df.group == g]
        out[g] = {"n": int(len(sub)), "median_units": float(sub.n_units.median()) if len(sub) else None,
                  "mean_units": float(sub.n_units.mean()) if len(sub) else None,
                  "capped": int(sub.capped.sum()),
                  "mean_test_acc_change": float(sub.test_acc_change.mean()) if len(sub) else None,
                  "mean_clean_acc_change": float(sub.clean_acc_change.mean()) if len(sub) else None}
    a, b = df[df.group == "noisy"].n_units, df[df.group == "clean"].n_units
    out["mannwhitney_p_noisy_fewer"] = float(mannwhitneyu(a, b, alternative="less").pvalue) if len(a) and len(b) else None
    return out
