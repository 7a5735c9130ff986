"""Does a localizer find memorization where it really is? Chang et al.'s (NAACL 2024) two benchmarks, for
classifiers (here; new: flipped labels are the memorized targets) and language models (:mod:`.groundtruth_lm`).

- **INJ** (:func:`injection_benchmark`): take a trained model, draw ``ratio`` of the units of each chosen layer at
  random, and fine-tune only those units (their parameter slices: weight row, bias, BatchNorm scale and shift of
  the unit; every other entry is restored bit for bit after each step) until a fresh set of examples, never
  trained on, is fitted with flipped labels. Each localizer then ranks the units for that set (``joint``: one
  ranking for the set) and scores **recall at k**: the share of injected units among the top ``k`` of each layer,
  ``k`` = the number injected there (MemPi's per-layer recall, micro-averaged over layers). A random ranking
  scores ``ratio`` on average.
- **DEL** (:func:`deletion_benchmark`): for each memorized noisy example (predicted with its flipped label),
  each localizer ranks the units; the top ``fraction`` of every layer is zeroed and the benchmark reports whether
  the example is forgotten (no longer predicted with its flipped label), the collateral damage (the share of the
  *other* memorized noisy examples still predicted with their flipped labels; test and clean-training accuracy),
  next to ``"random"``, which zeroes as many units per layer.

Both return a result table and have a plot (:func:`plot_groundtruth`).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..hooks import ablate, copy_model, model_device
from ..results import make_result
from ..validate import ConfigError, choice, number
from .ablate import find_units, unit_slices
from .localize import METHODS, classifier_targets, localize, top_units

CLASSIFIER_METHODS = ("hardconcrete", "slimming", "zero_out", "ig", "activations", "greedy", "random")


def _model_and_data(run_or_model, data, epoch=None):
    from ..train import Run

    if isinstance(run_or_model, (str, Run)) or hasattr(run_or_model, "__fspath__"):
        run = run_or_model if isinstance(run_or_model, Run) else Run(run_or_model)
        return run.model(epoch).eval(), run.data() if data is None else data
    if data is None:
        raise ConfigError("Pass data= (the Dataset the model was trained on) with a model; a run carries its own.")
    return run_or_model.eval(), data


def inject_units(model, x_keep, y_keep, x_new, y_new, units: dict[str, list[int]], lr: float = 1e-2,
                 max_steps: int = 500, keep_batch: int = 128, seed: int = 0, progress: bool = False):
    """A copy of ``model`` in which only ``units`` (``{layer: [index]}``) were fine-tuned (Adam, no weight decay,
    the model in eval mode so BatchNorm statistics stay put) until every ``(x_new, y_new)`` is predicted, mixing
    in a seeded batch of ``(x_keep, y_keep)`` per step so that the rest of the model's function is kept.
    Returns ``(model, info)``; ``info``: steps, fitted share, the parameter entries that could change."""
    dev = model_device(model)
    m = copy_model(model).eval()
    masks = {k: v.to(dev) for k, v in unit_slices(m, find_units(m, list(units)), units).items()}
    params = dict(m.named_parameters())
    orig = {k: p.detach().clone() for k, p in params.items()}
    for k, p in params.items():
        p.requires_grad_(k in masks)
    opt = torch.optim.Adam([params[k] for k in masks], lr=lr)
    g = torch.Generator().manual_seed(seed)
    x_new, y_new = x_new.to(dev), y_new.to(dev)
    fitted = 0.0
    step = 0
    for step in tqdm(range(max_steps), desc="injecting", disable=not progress, leave=False):
        with torch.no_grad():
            fitted = float((m(x_new).argmax(1) == y_new).float().mean())
        if fitted == 1.0:
            break
        idx = torch.randint(len(x_keep), (min(keep_batch, len(x_keep)),), generator=g)
        loss = F.cross_entropy(m(x_new), y_new) + F.cross_entropy(m(x_keep[idx].to(dev)), y_keep[idx].to(dev))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # every entry outside the units stays exactly as it was
            for k, p in params.items():
                if k in masks:
                    p.copy_(torch.where(masks[k], p, orig[k]))
    for p in m.parameters():
        p.requires_grad_(True)
    return m, {"steps": step, "fitted": fitted, "trainable_entries": int(sum(v.sum() for v in masks.values()))}


def _random_units(sizes: dict[str, int], ratio: float, seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    return {layer: sorted(rng.choice(n, size=max(1, int(round(ratio * n))), replace=False).tolist())
            for layer, n in sizes.items()}


def injection_benchmark(run_or_model, data=None, layers: Sequence[str] | None = None, ratio: float = 0.05,
                        n_examples: int = 20, methods: Sequence[str] = CLASSIFIER_METHODS, repeats: int = 1,
                        lr: float = 5e-2, max_steps: int = 500, seed: int = 0, progress: bool = True,
                        method_options: dict | None = None) -> pd.DataFrame:
    """INJ for a classifier (module docstring). ``run_or_model``: a :class:`~memloc.record.Run` (its last epoch)
    or a model with ``data``. ``n_examples`` test-split examples (never trained on) get a random other label and
    are injected into ``ratio`` of the units of each of ``layers``; ``repeats`` independent injections (seeds
    ``seed``, ``seed + 1`` ...). One row per method and repeat: ``recall`` (micro over layers), ``baseline``
    (the random ranking's expectation, the injected share), ``recall_<layer>``, ``fitted``, ``seconds``."""
    model, data = _model_and_data(run_or_model, data)
    number("ratio", ratio, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    number("n_examples", n_examples, lo=1, integer=True)
    number("repeats", repeats, lo=1, integer=True)
    for m in methods:
        choice("method", m, METHODS)
    method_options = method_options or {}
    test = np.flatnonzero(data.split == "test")
    train = np.flatnonzero(data.split == "train")
    if len(test) < n_examples:
        raise ConfigError(f"The data has {len(test)} test examples; INJ needs {n_examples} fresh ones (never "
                          "trained on). Lower n_examples.")
    sizes = dict(zip(*_sizes(model, data, layers)))
    rows = []
    for rep in range(repeats):
        s = seed + rep
        rng = np.random.default_rng(s)
        pick = rng.choice(test, size=n_examples, replace=False)
        x_new = data.x[pick]
        y_new = torch.as_tensor([(int(c) + int(rng.integers(1, data.num_classes))) % data.num_classes
                                 for c in data.y[pick]])
        units = _random_units(sizes, ratio, s)
        inj, info = inject_units(model, data.x[train], data.y[train], x_new, y_new, units, lr=lr,
                                 max_steps=max_steps, seed=s, progress=progress)
        with torch.no_grad():
            test_acc = float((inj(data.x[test].to(model_device(inj))).argmax(1).cpu() == data.y[test]).float().mean())
            test_before = float((model(data.x[test].to(model_device(model))).argmax(1).cpu() == data.y[test])
                                .float().mean())
        targets = classifier_targets(inj, x_new, y_new, list(sizes), ids=data.example_id[pick].tolist())
        for meth in tqdm(methods, desc=f"INJ localizers (repeat {rep})", disable=not progress, leave=False):
            opts = dict(method_options.get(meth, {}))
            if meth == "greedy":
                opts.setdefault("data", None)
            table = localize(targets, meth, joint=True, seed=s, **opts)
            top = top_units(table, k={l: len(v) for l, v in units.items()})
            hits = {l: len(set(top[l]) & set(units[l])) for l in units}
            rows.append({"method": meth, "repeat": rep, "recall": sum(hits.values()) / sum(map(len, units.values())),
                         "baseline": sum(map(len, units.values())) / sum(sizes.values()),
                         **{f"recall_{l}": hits[l] / len(units[l]) for l in units},
                         "injected": sum(map(len, units.values())), "fitted": info["fitted"],
                         "inject_steps": info["steps"], "test_acc_before": test_before,
                         "test_acc_after_injection": test_acc,
                         "mask_steps": float(np.mean(table.attrs["steps"])) if "steps" in table.attrs else np.nan,
                         "seconds": table.attrs["seconds"]})
    return make_result(pd.DataFrame(rows), benchmark="INJ", kind="classifier", ratio=ratio, n_examples=n_examples,
                       layers=list(sizes), repeats=repeats, lr=lr, max_steps=max_steps, seed=seed,
                       methods=list(methods), method_options={k: {kk: vv for kk, vv in v.items() if kk != "data"}
                                                              for k, v in method_options.items()})


def _sizes(model, data, layers):
    t = classifier_targets(model, data.x[:1], data.y[:1], layers)
    return t.sites, t.sizes


def memorized_noisy(model, data, batch_size: int = 2048) -> np.ndarray:
    """Positions of the noisy training examples that ``model`` predicts with their flipped label."""
    noisy = np.flatnonzero(data.group == "noisy")
    if len(noisy) == 0:
        raise ConfigError("The data has no noisy (label-flipped) examples; DEL needs memorized targets.")
    dev = model_device(model)
    with torch.no_grad():
        pred = torch.cat([model(data.x[noisy[i:i + batch_size]].to(dev)).argmax(1).cpu()
                          for i in range(0, len(noisy), batch_size)])
    return noisy[(pred == data.y[noisy]).numpy()]


def deletion_benchmark(run_or_model, data=None, layers: Sequence[str] | None = None,
                       fractions: Sequence[float] = (0.01, 0.02, 0.05, 0.1), n_targets: int = 20,
                       methods: Sequence[str] = CLASSIFIER_METHODS, n_collateral: int = 200, seed: int = 0,
                       progress: bool = True, method_options: dict | None = None) -> pd.DataFrame:
    """DEL for a classifier (module docstring): ``n_targets`` memorized noisy examples (seeded); per method and
    fraction, per target, the top ``fraction`` of each layer's units zeroed. One row per method, fraction and
    target: ``forgot`` (the target no longer predicted with its flipped label), ``target_prob`` (its flipped
    label's probability), ``collateral`` (share of up to ``n_collateral`` *other* memorized noisy examples still
    memorized), ``test_acc``, ``clean_acc`` (a seeded sample of clean training examples), ``units`` (zeroed per
    layer, identical across methods). ``attrs``: the unablated accuracies."""
    model, data = _model_and_data(run_or_model, data)
    for f in fractions:
        number("fraction", f, lo=0.0, hi=1.0, lo_open=True)
    number("n_targets", n_targets, lo=1, integer=True)
    for m in methods:
        choice("method", m, METHODS)
    method_options = method_options or {}
    mem = memorized_noisy(model, data)
    if len(mem) < 2:
        raise ConfigError(f"The model memorizes {len(mem)} noisy examples; DEL needs at least 2.")
    rng = np.random.default_rng(seed)
    tpos = rng.choice(mem, size=min(n_targets, len(mem) - 1), replace=False)
    others = np.setdiff1d(mem, tpos)
    others = rng.choice(others, size=min(n_collateral, len(others)), replace=False)
    test = np.flatnonzero(data.split == "test")
    clean = np.flatnonzero(data.group == "clean")
    clean = rng.choice(clean, size=min(1000, len(clean)), replace=False)
    dev = model_device(model)

    def evaluate(units):
        with torch.no_grad(), (ablate(model, units) if units else contextlib.nullcontext()):
            def acc(pos, labels):
                if len(pos) == 0:
                    return float("nan")
                return float((model(data.x[pos].to(dev)).argmax(1).cpu() == labels).float().mean())
            return acc(others, data.y[others]), acc(test, data.y[test]), acc(clean, data.y[clean])

    base = evaluate({})
    targets = classifier_targets(model, data.x[tpos], data.y[tpos], layers, ids=data.example_id[tpos].tolist())
    rows = []
    for meth in tqdm(methods, desc="DEL localizers", disable=not progress, leave=False):
        opts = dict(method_options.get(meth, {}))
        if meth == "greedy":
            opts.setdefault("data", data)
        table = localize(targets, meth, seed=seed, **opts)
        for frac in fractions:
            for i, p in enumerate(tpos):
                units = top_units(table, fraction=frac, target=targets.ids[i])
                with torch.no_grad(), ablate(model, units):
                    prob = model(data.x[p:p + 1].to(dev)).softmax(1)[0].cpu()
                coll, tacc, cacc = evaluate(units)
                rows.append({"method": meth, "fraction": frac, "target": int(data.example_id[p]),
                             "forgot": bool(int(prob.argmax()) != int(data.y[p])),
                             "target_prob": float(prob[int(data.y[p])]), "collateral": coll, "test_acc": tacc,
                             "clean_acc": cacc, "units": sum(map(len, units.values())),
                             "units_per_layer": {k: len(v) for k, v in units.items()}, "seconds": table.attrs["seconds"]})
    res = make_result(pd.DataFrame(rows), benchmark="DEL", kind="classifier", fractions=list(fractions),
                      n_targets=len(tpos), n_collateral=len(others), layers=targets.sites, seed=seed,
                      methods=list(methods), unablated={"collateral": base[0], "test_acc": base[1],
                                                        "clean_acc": base[2]})
    return res


def summarize_deletion(table: pd.DataFrame) -> pd.DataFrame:
    """Per method and fraction: share of targets forgotten, mean collateral, test and clean accuracy."""
    cols = [c for c in ("forgot", "exact_after", "token_acc_after", "levenshtein", "collateral", "collateral_exact",
                        "test_acc", "clean_acc", "perplexity", "units") if c in table]
    return table.groupby(["method", "fraction"], sort=False)[cols].mean().reset_index()


def plot_groundtruth(table: pd.DataFrame):
    """INJ: recall at k per method with the random baseline; DEL: forgetting, collateral and general performance
    against the fraction of units removed, one line per method."""
    import matplotlib.pyplot as plt

    if not len(table):  # a benchmark the report had to skip
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "skipped: " + str(table.attrs.get("settings", {}).get("skipped", "no rows")), ha="center",
                va="center", wrap=True, fontsize=9)
        return fig
    if table.attrs.get("settings", {}).get("benchmark", table.attrs.get("benchmark")) == "INJ" or "recall" in table:
        s = table.groupby("method", sort=False).recall.agg(["mean", "std"]).fillna(0)
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.bar(s.index, s["mean"], yerr=s["std"], color="tab:blue")
        ax.axhline(table.baseline.mean(), color="k", ls="--", label=f"random ({table.baseline.mean():.1%})")
        ax.set_ylabel("recall of injected units at k")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        return fig
    summ = summarize_deletion(table)
    forget = "forgot" if "forgot" in summ else "exact_after"
    panels = [(forget, "targets forgotten" if forget == "forgot" else "target suffix exact match (lower = forgotten)"),
              ("collateral" if "collateral" in summ else "collateral_exact", "other memorized kept"),
              ("test_acc" if "test_acc" in summ else "perplexity",
               "test accuracy" if "test_acc" in summ else "held-out perplexity")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3))
    for ax, (col, label) in zip(axes, panels):
        for meth, g in summ.groupby("method", sort=False):
            ax.plot(g.fraction, g[col], marker="o", label=meth, ls="--" if meth == "random" else "-")
        ax.set_xlabel("fraction of each layer's units removed")
        ax.set_ylabel(label)
        ax.set_xscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# language models

LM_METHODS = ("hardconcrete", "slimming", "zero_out", "ig", "activations", "random")


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insertions, deletions, substitutions all cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _lm_masks(targets, units: dict[str, list[int]]):
    dev = model_device(targets.model)
    masks = {}
    for s, k in zip(targets.sites, targets.sizes):
        if units.get(s):
            m = torch.ones(1, k, device=dev)
            m[0, torch.tensor(units[s])] = 0
            masks[s] = m
    return masks


def injection_benchmark_lm(lm, texts: Sequence[str], layers: Sequence[int] | None = None, ratio: float = 0.02,
                           methods: Sequence[str] = LM_METHODS, lr: float = 1e-2, max_steps: int = 300,
                           stop_loss: float = 0.05, seed: int = 0, progress: bool = True,
                           method_options: dict | None = None) -> pd.DataFrame:
    """INJ for a language model (MemPi's ``inject.py``): for each of ``texts`` (sequences the model never saw), a
    seeded random ``ratio`` of the FFN hidden units of each of ``layers`` is drawn and only their value vectors
    (the MLP output matrix's entries of those units) are fine-tuned (Adam) on the whole text's next-token loss
    until it is below ``stop_loss`` or ``max_steps`` (``extractable``: greedy decoding from the first token then
    reproduces the text); each localizer ranks the units for that text (its first
    token the prefix, as MemPi's INJ) and scores recall at k per layer (k = the number injected there). The
    model is restored bit for bit after each text. One row per text and method: ``recall``, ``baseline``,
    ``final_loss``, ``steps``, ``seconds``."""
    from ..analyses.lm import _lm
    from .localize import sequence_targets

    lm = _lm(lm)
    number("ratio", ratio, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    for m in methods:
        choice("method", m, METHODS)
    if "greedy" in methods:
        raise ConfigError("Greedy ablation localizes classifier examples; drop it from methods for a language model.")
    method_options = method_options or {}
    model = lm.model
    n_layers = lm.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    from ..hooks import replace_parameters
    from ..models.lm import mlp_out_weight
    from .localize import LM_SITE, _frozen

    rows = []
    texts = list(texts)
    for ti, text in enumerate(tqdm(texts, desc="INJ texts", disable=not progress, leave=False)):
        s = seed * 1000 + ti
        units = _random_units({LM_SITE.format(l): lm.cfg.d_mlp for l in layers}, ratio, s)
        named = {l: mlp_out_weight(model, l) for l in layers}
        mats = {l: (w, tr) for l, (_, w, tr) in named.items()}
        saved = {l: w.detach().clone() for l, (w, _) in mats.items()}
        # the model is frozen but for the value matrices, and its weights come back bit for bit on exit
        with _frozen(model), replace_parameters(model, {nm: saved[l] for l, (nm, _, _) in named.items()}):
            masks = {}
            for l, (w, tr) in mats.items():
                m = torch.zeros_like(w, dtype=torch.bool)
                idx = torch.tensor(units[LM_SITE.format(l)])
                if tr:
                    m[idx] = True
                else:
                    m[:, idx] = True
                masks[l] = m
                w.requires_grad_(True)
            opt = torch.optim.Adam([w for w, _ in mats.values()], lr=lr)
            t1 = sequence_targets(lm, [text], layers, prefix_tokens=1)
            loss = float("nan")
            step = 0
            for step in range(max_steps):
                lo = t1.losses([0])[0]
                loss = float(lo.detach())
                if loss < stop_loss:
                    break
                opt.zero_grad()
                lo.backward()
                with torch.no_grad():
                    for l, (w, _) in mats.items():
                        w.grad[~masks[l]] = 0
                opt.step()
                with torch.no_grad():
                    for l, (w, _) in mats.items():
                        w.copy_(torch.where(masks[l], w, saved[l]))
            for w, _ in mats.values():
                w.requires_grad_(False)
            with torch.no_grad():
                (pred, gold), = t1.predictions([0])
            extractable = pred == gold  # every token right under teacher forcing = greedy extraction
            for meth in methods:
                table = localize(t1, meth, seed=s, **dict(method_options.get(meth, {})))
                top = top_units(table, k={k: len(v) for k, v in units.items()})
                hits = {k: len(set(top[k]) & set(units[k])) for k in units}
                rows.append({"text": ti, "method": meth, "recall": sum(hits.values()) / sum(map(len, units.values())),
                             "baseline": sum(map(len, units.values())) / (lm.cfg.d_mlp * len(layers)),
                             **{f"recall_L{k.split('.')[1]}": hits[k] / len(units[k]) for k in units},
                             "final_loss": loss, "extractable": extractable, "steps": step,
                             "mask_steps": float(np.mean(table.attrs["steps"])) if "steps" in table.attrs else np.nan,
                             "seconds": table.attrs["seconds"]})
    return make_result(pd.DataFrame(rows), benchmark="INJ", kind="language model", ratio=ratio, layers=layers,
                       n_texts=len(texts), lr=lr, max_steps=max_steps, stop_loss=stop_loss, seed=seed,
                       methods=list(methods), **lm.settings)


def deletion_benchmark_lm(lm, memorized: pd.DataFrame, heldout: Sequence[str], layers: Sequence[int] | None = None,
                          fractions: Sequence[float] = (0.005, 0.01, 0.02, 0.05), n_targets: int = 10,
                          methods: Sequence[str] = LM_METHODS, seed: int = 0, progress: bool = True,
                          method_options: dict | None = None) -> pd.DataFrame:
    """DEL for a language model (MemPi's ``downstream.py``): ``memorized`` is
    :func:`memloc.analyses.lm.memorized_sequences`' table; ``n_targets`` of its extractable rows (seeded) are the
    targets and the other extractable rows the collateral set; ``heldout``: texts for perplexity. Per method,
    fraction and target, the top ``fraction`` of each layer's FFN units (by the target's ranking) are zeroed at
    every position. Rows: ``exact_after`` (every suffix token right under teacher forcing, which equals greedy
    extraction), ``token_acc_after``, ``levenshtein`` (characters, teacher-forced prediction vs the true
    suffix), ``collateral_exact`` and ``collateral_acc`` (the other memorized sequences), ``perplexity``
    (``exp`` of the mean token NLL of ``heldout``; MemPi's code uses ``exp2``), ``units``."""
    from ..analyses.lm import _lm
    from .localize import sequence_targets

    lm = _lm(lm)
    for f in fractions:
        number("fraction", f, lo=0.0, hi=1.0, lo_open=True)
    for m in methods:
        choice("method", m, METHODS)
    if "greedy" in methods:
        raise ConfigError("Greedy ablation localizes classifier examples; drop it from methods for a language model.")
    method_options = method_options or {}
    ext = memorized[memorized.get("extractable", pd.Series(False, index=memorized.index)).fillna(False).astype(bool)]
    if len(ext) < 2:
        raise ConfigError(f"{len(ext)} extractable sequences; DEL needs at least 2 (one target, one for collateral). "
                          "Use memorized_sequences on texts the model memorized, or shorter prefix/suffix.")
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(ext), size=min(n_targets, len(ext) - 1), replace=False)
    tgt = ext.iloc[np.sort(pick)]
    oth = ext.drop(index=tgt.index)
    tgt.attrs, oth.attrs = dict(memorized.attrs), dict(memorized.attrs)  # prefix / suffix token counts
    T = sequence_targets(lm, tgt, layers)
    O = sequence_targets(lm, oth, layers)
    H = sequence_targets(lm, list(heldout), layers, prefix_tokens=1)

    def held_ppl(masks):
        with torch.no_grad():
            return float(np.exp(float(H.losses(list(range(H.n)), masks).mean())))

    def stats(preds):
        acc = [float(np.mean(np.equal(p, g))) for p, g in preds]
        return acc, [float(all(np.equal(p, g))) for p, g in preds]

    with torch.no_grad():
        base_acc, base_exact = stats(O.predictions(list(range(O.n))))
    base = {"collateral_exact": float(np.mean(base_exact)), "collateral_acc": float(np.mean(base_acc)),
            "perplexity": held_ppl(None)}
    rows = []
    for meth in tqdm(methods, desc="DEL localizers", disable=not progress, leave=False):
        table = localize(T, meth, seed=seed, **dict(method_options.get(meth, {})))
        for frac in fractions:
            for i, tid in enumerate(T.ids):
                units = top_units(table, fraction=frac, target=tid)
                masks = _lm_masks(T, units)
                with torch.no_grad():
                    (p, g), = T.predictions([i], masks)
                    o_acc, o_exact = stats(O.predictions(list(range(O.n)), masks))
                rows.append({"method": meth, "fraction": frac, "target": tid,
                             "exact_after": float(p == g), "token_acc_after": float(np.mean(np.equal(p, g))),
                             "levenshtein": levenshtein(lm.decode(p), lm.decode(g)),
                             "collateral_exact": float(np.mean(o_exact)), "collateral_acc": float(np.mean(o_acc)),
                             "perplexity": held_ppl(masks), "units": sum(map(len, units.values())),
                             "units_per_layer": {k: len(v) for k, v in units.items()},
                             "seconds": table.attrs["seconds"]})
    return make_result(pd.DataFrame(rows), benchmark="DEL", kind="language model", fractions=list(fractions),
                       n_targets=T.n, n_collateral=O.n, n_heldout=H.n, layers=T.extra["layers"], seed=seed,
                       methods=list(methods), unablated=base, **lm.settings)


# ---------------------------------------------------------------------------------------------------------------
# one entry for a run folder (the CLI and the reports)

LM_SEQUENCE_TOKENS = {"word": (3, 2), "gpt2": (8, 8)}
"""Prefix and suffix tokens of the memorized sequences DEL uses on each language testbed (the word testbed's texts
are 4-6 words; the GPT-2 testbed's biographies are longer)."""


def run_groundtruth(run, kind: str, methods: Sequence[str] | None = None, fractions: Sequence[float] | None = None,
                    ratio: float | None = None, n: int | None = None, seed: int = 0, progress: bool = True,
                    device: str = "cpu") -> pd.DataFrame:
    """INJ (``kind="inj"``) or DEL (``"del"``) on a run folder: a classifier run (:class:`~memloc.train.Run`, its
    last epoch, its data) or a language-model run (:class:`~memloc.models.transformer.LMRun`: INJ on
    :func:`memloc.data.facts.counterfactual_texts`, DEL on the memorized training texts with the held-out templates' texts for
    perplexity). ``n``: INJ examples / texts, DEL targets. Defaults per kind of run are in the settings."""
    from pathlib import Path

    choice("kind", kind, ("inj", "del"))
    path = Path(getattr(run, "path", run))
    if (path / "world.json").exists():
        from ..analyses.lm import memorized_sequences
        from ..models.transformer import LMRun

        lmrun = run if hasattr(run, "world") else LMRun(path)
        lm = lmrun.lm(device=device)
        world = lmrun.world
        methods = list(methods or LM_METHODS)
        if kind == "inj":
            from ..data.facts import counterfactual_texts

            texts = counterfactual_texts(world, n or 5, seed)
            return injection_benchmark_lm(lm, texts, ratio=ratio or 0.02, methods=methods, seed=seed,
                                          progress=progress)
        k, m = LM_SEQUENCE_TOKENS.get(lmrun.kind, (8, 8))
        mem = memorized_sequences(lm, world.training_text(), prefix_tokens=k, suffix_tokens=m)
        held = [f"{p} {f.object}" for f in world.facts for p in world.prompts(f, "heldout")][:200]
        return deletion_benchmark_lm(lm, mem, held, fractions=fractions or (0.005, 0.01, 0.02, 0.05),
                                     n_targets=n or 10, methods=methods, seed=seed, progress=progress)
    from ..train import Run

    crun = run if isinstance(run, Run) else Run(path, device=device)
    methods = list(methods or CLASSIFIER_METHODS)
    if kind == "inj":
        return injection_benchmark(crun, ratio=ratio or 0.05, n_examples=n or 20, methods=methods, seed=seed,
                                   progress=progress)
    return deletion_benchmark(crun, fractions=fractions or (0.01, 0.02, 0.05, 0.1), n_targets=n or 20,
                              methods=methods, seed=seed, progress=progress)


def describe_groundtruth(table: pd.DataFrame) -> str:
    """The benchmark's table as text, with its settings (what the CLI prints)."""
    st = table.attrs.get("settings", {})
    keep = {k: st[k] for k in ("benchmark", "kind", "ratio", "fractions", "n_examples", "n_texts", "n_targets",
                               "n_collateral", "layers", "seed", "lr", "max_steps") if k in st}
    head = f"settings: {keep}"
    if st.get("benchmark") == "INJ":
        s = table.groupby("method", sort=False).agg(recall=("recall", "mean"), sd=("recall", "std"),
                                                    random_expectation=("baseline", "mean"),
                                                    seconds=("seconds", "mean")).round(3)
        return f"{head}\nINJ: recall at k of the injected units (k = injected per layer)\n{s.to_string()}"
    return (f"{head}\nunablated: {st.get('unablated')}\nDEL: means over targets\n"
            f"{summarize_deletion(table).round(3).to_string(index=False)}")


def or_skipped(fn):
    """``fn()``, or an empty result saying why the benchmark could not run on this model (e.g. a run that memorized
    no noisy example): for the reports, which go on with the other sections."""
    try:
        return fn()
    except ConfigError as e:
        return make_result(pd.DataFrame(), skipped=str(e))


def groundtruth_findings(inj: pd.DataFrame | None, dele: pd.DataFrame | None) -> list[str]:
    """One sentence per benchmark for the reports, with the settings that produced the numbers."""
    out = []
    for name, t in (("INJ", inj), ("DEL", dele)):
        if t is not None and not len(t) and t.attrs.get("settings", {}).get("skipped"):
            out.append(f"{name} skipped: {t.attrs['settings']['skipped']}")
    if inj is not None and len(inj):
        st = inj.attrs.get("settings", {})
        s = inj.groupby("method", sort=False).recall.mean().sort_values(ascending=False)
        what = (f"{st.get('n_examples')} fresh examples with flipped labels" if st.get("kind") == "classifier"
                else f"{st.get('n_texts')} unseen texts")
        out.append(f"INJ (Chang et al. 2024; {what} injected into a random {st.get('ratio', 0):.0%} of each layer's "
                   f"units): recall at k of the injected units " + ", ".join(f"{m} {v:.2f}" for m, v in s.items())
                   + f" (random expectation {inj.baseline.mean():.2f}).")
    if dele is not None and len(dele):
        st = dele.attrs.get("settings", {})
        summ = summarize_deletion(dele)
        frac = sorted(summ.fraction.unique())[len(summ.fraction.unique()) // 2]
        row = summ[summ.fraction == frac]
        if "forgot" in summ:
            parts = [f"{r.method} {r.forgot:.0%} forgotten / {r.collateral:.0%} kept / test {r.test_acc:.1%}"
                     for r in row.itertuples()]
        else:
            parts = [f"{r.method} exact {r.exact_after:.0%} / others {r.collateral_exact:.0%} / ppl {r.perplexity:.1f}"
                     for r in row.itertuples()]
        out.append(f"DEL ({st.get('n_targets')} memorized targets, top {frac:.1%} of each layer's units zeroed per "
                   f"target; unablated {st.get('unablated')}): " + "; ".join(parts) + ".")
    return out
