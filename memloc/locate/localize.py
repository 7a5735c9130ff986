"""Localizers behind one interface: which neurons hold a set of memorized targets? (Chang et al., NAACL 2024,
"Do localization methods actually localize memorized data in LLMs?", terarachang/MemPi.)

``localize(model, targets, method=...)`` ranks the neurons of chosen layers for each target and returns one tidy
table ``target, layer, neuron, score, rank`` (rank 0 = most responsible). Targets are

- **classifier examples** (:func:`classifier_targets`): inputs and the labels they were trained on (the flipped
  label of a noisy example); the loss is the cross-entropy of that label; neurons are the output features /
  channels of module paths (``"layers.2"``);
- **memorized sequences** (:func:`sequence_targets`): a prefix and its suffix; the loss is the mean next-token
  cross-entropy of the suffix tokens (MemPi's DEL loss); neurons are the FFN hidden units
  ``blocks.{l}.mlp.hook_post`` (MemPi's ``mlp.act``).

Every method sees the model only through per-neuron multipliers ``m`` on the chosen sites (``act * m``, at every
position), one row of multipliers per target, so many targets are handled in one batch and the model's weights
are never touched (its ``requires_grad`` flags are restored too). Methods (MemPi's definitions, departures on
docs/conventions.md):

- ``"hardconcrete"``: an L0-relaxed gate per neuron (Louizos et al. 2018), stretched to ``(-0.1, 1.1)``,
  temperature ``beta``, trained to keep the target's loss low while the expected fraction of open gates falls
  (``loss + lam * E[L0] / N``) until that fraction is below ``stop``; score ``sigmoid(logit)``.
- ``"slimming"``: a coefficient per neuron clipped to [0, 1], ``loss + lam * mean|c|`` until the mean is below
  ``stop``; score ``clip(c, 0, 1)``.
- ``"zero_out"``: the rise of the target's loss when the neuron alone is zeroed.
- ``"ig"``: integrated gradients of the target's probability (mean over suffix tokens) along ``alpha * act``
  for one layer at a time (captum), ``steps`` points.
- ``"activations"``: ``|mean activation|`` over the positions that predict the suffix (classifier: over the
  example's spatial positions) times the norm of the neuron's value vector (the MLP output row; 1 for classifiers).
- ``"greedy"`` (classifiers): Maini et al.'s greedy ablation (:func:`memloc.locate.greedy_flip`); the units it
  zeroes score ``1 / (order + 1)``, the rest 0.
- ``"random"``: a seeded random score (the control).

Each target's masks are trained independently even when batched (per-target losses are summed and the noise of
each target comes from its own generator), so ``batched=False`` (one target at a time) gives the same scores; it
exists for the benchmark. ``joint=True`` trains one mask for all targets together (the mask methods; the others
average the per-target scores).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..hooks import hooks, model_device, require_eval
from ..results import make_result
from ..validate import ConfigError, choice, number

METHODS = ("hardconcrete", "slimming", "zero_out", "ig", "activations", "greedy", "random")
MASK_METHODS = ("hardconcrete", "slimming")
LM_SITE = "blocks.{}.mlp.hook_post"

# MemPi's settings for GPT-2 small (script/ecbd/HC.sh, slim.sh at ratio 0.001; zero-out and IG defaults);
# max_steps 4000 there, 1000 here (the small models here reach the stop criterion well before).
DEFAULTS = {
    "hardconcrete": {"lr": 1e-2, "lam": 1000.0, "mask_p": 0.5, "beta": 0.33, "stop": 0.4, "max_steps": 1000},
    "slimming": {"lr": 5e-3, "lam": 15000.0, "stop": 0.2, "max_steps": 1000},
    "ig": {"steps": 20, "method": "riemann_trapezoid"},
}
HC_L, HC_R = -0.1, 1.1


@dataclass
class Targets:
    """What a localizer needs of a model and its targets: the neuron sites, and per-target losses under
    per-neuron multipliers. Built by :func:`classifier_targets` or :func:`sequence_targets`."""

    kind: str  # "classifier" or "sequence"
    model: torch.nn.Module
    sites: list[str]
    sizes: list[int]
    n: int
    ids: list  # a label per target (example id or text id)
    _run: Callable  # (rows, masks {site: [len(rows) or 1, size]}, what) -> per-row loss / prob / activations
    value_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def losses(self, rows, masks=None) -> torch.Tensor:
        return self._run(rows, masks, "loss")

    def probs(self, rows, masks=None) -> torch.Tensor:
        return self._run(rows, masks, "prob")

    def activations(self, rows) -> dict[str, torch.Tensor]:
        return self._run(rows, None, "acts")

    def predictions(self, rows, masks=None) -> list[tuple[list[int], list[int]]]:
        """Sequences only: per row, the teacher-forced argmax tokens at the suffix positions and the true ones."""
        return self._run(rows, masks, "preds")

    @property
    def total(self) -> int:
        return sum(self.sizes)


def _masking_hooks(sites, dims, masks, store=None):
    """Hooks multiplying each site's output by its mask rows ``[B or 1, size]`` along the neuron axis; with
    ``store``, the outputs are recorded instead (no masking)."""
    fns = {}
    for s, d in zip(sites, dims):
        def fn(out, s=s, d=d):
            if store is not None:
                store[s] = out
                return None
            m = masks.get(s) if masks else None
            if m is None:
                return None
            shape = [1] * out.ndim
            shape[0] = m.shape[0]
            shape[d] = m.shape[1]
            if d != 1 and out.ndim > 2:  # sequences [B, T, size]: the row's mask at every position
                return out * m.view(m.shape[0], *([1] * (out.ndim - 2)), m.shape[1])
            return out * m.view(shape)
        fns[s] = fn
    return fns


def classifier_targets(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, layers: str | Sequence[str] | None = None,
                       ids: Sequence | None = None, batch_size: int = 512) -> Targets:
    """Targets for a classifier: inputs ``x`` and the labels ``y`` they were trained on; neurons are the output
    features / channels (axis 1) of ``layers`` (module paths; default every layer but the head)."""
    from ._common import resolve_layers

    require_eval(model, "Localization")
    layers = resolve_layers(model, layers)
    x, y = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.long)
    if len(x) != len(y) or len(x) == 0:
        raise ConfigError(f"x ({len(x)}) and y ({len(y)}) must be non-empty and of the same length.")
    dev = model_device(model)
    sizes = []
    store: dict = {}
    with torch.no_grad(), hooks(model, _masking_hooks(layers, [1] * len(layers), None, store)):
        model(x[:1].to(dev))
    for s in layers:
        if not isinstance(store.get(s), torch.Tensor) or store[s].ndim < 2:
            raise ConfigError(f"Layer {s!r} does not output a [batch, features, ...] tensor; pick another layer.")
        sizes.append(int(store[s].shape[1]))

    def run(rows, masks, what):
        rows = torch.as_tensor(rows, dtype=torch.long)
        out = []
        for b in range(0, len(rows), batch_size):
            r = rows[b:b + batch_size]
            mk = None if masks is None else {s: (m if m.shape[0] == 1 else m[b:b + batch_size]) for s, m in masks.items()}
            st: dict = {}
            with hooks(model, _masking_hooks(layers, [1] * len(layers), mk, st if what == "acts" else None)):
                logits = model(x[r].to(dev))
            if what == "acts":
                out.append({s: v.flatten(2).mean(2) if v.ndim > 2 else v for s, v in st.items()})
            elif what == "loss":
                out.append(F.cross_entropy(logits, y[r].to(dev), reduction="none"))
            else:
                out.append(logits.softmax(-1).gather(1, y[r].to(dev)[:, None])[:, 0])
        if what == "acts":
            return {s: torch.cat([o[s] for o in out]) for s in layers}
        return torch.cat(out)

    return Targets("classifier", model, layers, sizes, len(x), list(ids) if ids is not None else list(range(len(x))),
                   run, extra={"x": x, "y": y})


def _value_norms(model, layer: int) -> torch.Tensor:
    """Norms of the MLP's value vectors (one per hidden unit) of ``layer``."""
    from ..models.lm import mlp_out_weight

    _, w, transposed = mlp_out_weight(model, layer)
    return w.detach().norm(dim=1 if transposed else 0).float().cpu()


def sequence_targets(lm, sequences, layers: Sequence[int] | None = None, prefix_tokens: int | None = None,
                     batch_size: int = 64) -> Targets:
    """Targets for a language model (the :class:`~memloc.models.lm.LM` handle): memorized sequences as rows of
    :func:`memloc.analyses.lm.memorized_sequences` (``prefix`` and ``suffix`` strings, ``text_id``), or
    ``(prefix, suffix)`` string pairs, or plain texts with ``prefix_tokens`` (their first tokens are the prefix).
    Neurons: the FFN hidden units of ``layers`` (default all)."""
    from ..analyses.lm import _lm

    lm = _lm(lm)
    model = lm.model
    require_eval(model, "Localization")
    n_layers = lm.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    for l in layers:
        if not 0 <= l < n_layers:
            raise ConfigError(f"Layer {l} is not a layer of this {n_layers}-layer model (0..{n_layers - 1}).")
    ids, pairs = _sequence_pairs(lm, sequences, prefix_tokens)
    bos = [lm.bos_id] if lm.prepend_bos else []
    seqs, starts = [], []
    for pi, si in pairs:
        if not si:
            raise ConfigError(f"Sequence {lm.decode(pi)!r} has no suffix tokens.")
        seqs.append(bos + list(pi) + list(si))
        starts.append(len(bos) + len(pi))
    tokens, lengths = lm.pad(seqs)
    starts_t = torch.tensor(starts)
    sites = [LM_SITE.format(l) for l in layers]
    dev = model_device(model)

    def run(rows, masks, what):
        rows = torch.as_tensor(rows, dtype=torch.long)
        out = []
        for b in range(0, len(rows), batch_size):
            r = rows[b:b + batch_size]
            T = int(lengths[r].max())
            tok = tokens[r, :T].to(dev)
            mk = None if masks is None else {s: (m if m.shape[0] == 1 else m[b:b + batch_size]) for s, m in masks.items()}
            st: dict = {}
            with hooks(model, _masking_hooks(sites, [-1] * len(sites), mk, st if what == "acts" else None)):
                logits = model(tok)
            pos = torch.arange(T - 1, device=dev)[None]
            # positions that predict a suffix token: start-1 .. length-2
            sel = ((pos >= (starts_t[r].to(dev)[:, None] - 1)) & (pos < (lengths[r].to(dev)[:, None] - 1))).float()
            if what == "acts":
                out.append({s: (v[:, :T - 1] * sel[..., None]).sum(1) / sel.sum(1, keepdim=True) for s, v in st.items()})
                continue
            if what == "preds":  # teacher-forced argmax at the suffix positions and the true tokens
                am = logits[:, :-1].argmax(-1)
                for i in range(len(r)):
                    keep = sel[i].bool()
                    out.append((am[i][keep].tolist(), tok[i, 1:][keep].tolist()))
                continue
            logp = logits[:, :-1].float().log_softmax(-1).gather(-1, tok[:, 1:, None])[..., 0]
            if what == "loss":
                out.append(-(logp * sel).sum(1) / sel.sum(1))
            else:
                out.append((logp.exp() * sel).sum(1) / sel.sum(1))
        if what == "acts":
            return {s: torch.cat([o[s] for o in out]) for s in sites}
        if what == "preds":
            return out
        return torch.cat(out)

    d_mlp = lm.cfg.d_mlp
    return Targets("sequence", model, sites, [d_mlp] * len(sites), len(seqs), ids, run,
                   value_norms={s: _value_norms(model, l) for s, l in zip(sites, layers)},
                   extra={"tokens": tokens, "lengths": lengths, "starts": starts_t, "layers": layers})


def _sequence_pairs(lm, sequences, prefix_tokens):
    """``(ids, [(prefix token ids, suffix token ids)])``. Memorized-sequence rows and plain texts are cut by token
    position (the text encoded without BOS, as :func:`memloc.analyses.lm.memorized_sequences` cuts it), so a name
    split mid-word stays one word; ``(prefix, suffix)`` string pairs are joined as a prompt and its continuation
    (:meth:`memloc.models.lm.LM.join`: a space between them unless one is there)."""
    if isinstance(sequences, pd.DataFrame):
        st = sequences.attrs.get("settings", {})
        if "text" in sequences and "prefix_tokens" in st and "suffix_tokens" in st:
            rows = sequences.dropna(subset=["prefix", "suffix"]) if "prefix" in sequences else sequences
            k, n = int(st["prefix_tokens"]), int(st["suffix_tokens"])
            out = []
            for t in rows["text"]:
                e = lm.encode(t, bos=False)
                if len(e) < k + 1:
                    raise ConfigError(f"Text {t[:40]!r} has {len(e)} tokens, fewer than prefix_tokens + 1 = {k + 1}.")
                out.append((e[:k], e[k:k + n]))
            ids = list(rows["text_id"]) if "text_id" in rows else list(range(len(rows)))
            return ids, out
        if not {"prefix", "suffix"} <= set(sequences.columns):
            raise ConfigError("A table of sequences needs memorized_sequences' rows (text, prefix_tokens and "
                              "suffix_tokens in its settings) or 'prefix' and 'suffix' columns; got "
                              f"{list(sequences.columns)}.")
        rows = sequences.dropna(subset=["prefix", "suffix"])
        ids = list(rows["text_id"]) if "text_id" in rows else list(range(len(rows)))
        return ids, [_joined(lm, p, s) for p, s in zip(rows["prefix"], rows["suffix"])]
    seqs = list(sequences)
    if not seqs:
        raise ConfigError("No sequences given.")
    if all(isinstance(s, str) for s in seqs):
        if prefix_tokens is None:
            raise ConfigError("Plain texts need prefix_tokens= (how many leading tokens are the prefix).")
        number("prefix_tokens", prefix_tokens, lo=1, integer=True)
        out = []
        for t in seqs:
            e = lm.encode(t, bos=False)
            if len(e) <= prefix_tokens:
                raise ConfigError(f"Text {t[:40]!r} has {len(e)} tokens, not more than prefix_tokens={prefix_tokens}.")
            out.append((e[:prefix_tokens], e[prefix_tokens:]))
        return list(range(len(seqs))), out
    if all(isinstance(s, (tuple, list)) and len(s) == 2 for s in seqs):
        return list(range(len(seqs))), [_joined(lm, str(p), str(s)) for p, s in seqs]
    raise ConfigError("Sequences must be memorized_sequences' rows, (prefix, suffix) pairs, or texts with "
                      "prefix_tokens=.")


def _joined(lm, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
    pi = lm.encode(prefix, bos=False)
    return pi, lm.encode(lm.join(prefix, suffix), bos=False)[len(pi):]


# ---------------------------------------------------------------------------------------------------------------
# methods: each returns {site: [n_targets (or 1 when joint), size]} scores


@contextlib.contextmanager
def _frozen(model):
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def _mask_method(t: Targets, rows: list[int], method: str, opts: dict, seed: int, joint: bool, progress) -> dict:
    dev = model_device(t.model)
    n = 1 if joint else len(rows)
    N = t.total
    if method == "hardconcrete":
        p = (opts["mask_p"] - HC_L) / (HC_R - HC_L)
        init = math.log(p / (1 - p))
    else:
        init = 1.0
    params = {s: torch.full((n, k), init, device=dev, requires_grad=True) for s, k in zip(t.sites, t.sizes)}
    opt = torch.optim.Adam(params.values(), lr=opts["lr"])
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + int(r)) for r in (rows[:1] if joint else rows)]
    beta = opts.get("beta", 1.0)
    final = {s: torch.zeros(n, k) for s, k in zip(t.sites, t.sizes)}
    done = torch.zeros(n, dtype=torch.bool)
    steps_taken = torch.zeros(n, dtype=torch.long)
    bar = tqdm(total=opts["max_steps"], desc=f"{method} masks", disable=not progress, leave=False)

    def reg_of(params):
        if method == "hardconcrete":
            shift = beta * math.log(-HC_L / HC_R)
            return sum(torch.sigmoid(v - shift).sum(1) for v in params.values()) / N
        return sum(v.abs().sum(1) for v in params.values()) / N

    def score_of(s):
        v = params[s].detach()
        return torch.sigmoid(v).cpu() if method == "hardconcrete" else v.clamp(0, 1).cpu()

    step = 0
    for step in range(opts["max_steps"]):
        if method == "hardconcrete":
            masks = {}
            for s, v in params.items():
                u = torch.stack([torch.rand(v.shape[1], generator=g) for g in gens]).clamp(1e-6, 1 - 1e-6).to(dev)
                sm = torch.sigmoid((torch.log(u) - torch.log(1 - u) + v) / beta)
                masks[s] = (sm * (HC_R - HC_L) + HC_L).clamp(0, 1)
        else:
            masks = {s: v.clamp(0, 1) for s, v in params.items()}
        reg = reg_of(params)
        # MemPi checks the stopping rule every 10 steps, before the step's update
        if step % 10 == 0:
            stop_now = (reg.detach().cpu() < opts["stop"]) & ~done
            for s in t.sites:
                final[s][stop_now] = score_of(s)[stop_now]
            steps_taken[stop_now] = step
            done |= stop_now
            if bool(done.all()):
                break
        loss = t.losses(rows, masks)
        if joint:
            loss = loss.mean()[None]
        total = (loss + opts["lam"] * reg)[~done.to(dev)].sum()
        opt.zero_grad()
        total.backward()
        with torch.no_grad():  # targets already stopped keep their final scores; their rows need no gradient
            for v in params.values():
                v.grad[done.to(dev)] = 0
        opt.step()
        bar.update(1)
    bar.close()
    for s in t.sites:
        final[s][~done] = score_of(s)[~done]
    steps_taken[~done] = step + 1
    return final, {"steps": steps_taken.tolist(), "reached_stop": done.tolist()}


def _zero_out(t: Targets, rows, progress) -> dict:
    dev = model_device(t.model)
    with torch.no_grad():
        base = t.losses(rows).cpu()
        out = {}
        bar = tqdm(total=t.total, desc="zero-out", disable=not progress, leave=False)
        for s, k in zip(t.sites, t.sizes):
            sc = torch.zeros(len(rows), k)
            for j in range(k):
                m = torch.ones(1, k, device=dev)
                m[0, j] = 0
                sc[:, j] = t.losses(rows, {s: m}).cpu() - base
                bar.update(1)
            out[s] = sc
        bar.close()
    return out


def _ig(t: Targets, rows, opts, progress) -> dict:
    from captum.attr import IntegratedGradients

    dev = model_device(t.model)
    out = {}
    for s, k in tqdm(list(zip(t.sites, t.sizes)), desc="integrated gradients", disable=not progress, leave=False):
        def f(m, idx, s=s):
            return t.probs(idx.cpu(), {s: m})
        ig = IntegratedGradients(f)
        ones = torch.ones(len(rows), k, device=dev)
        a = ig.attribute(ones, baselines=torch.zeros_like(ones), additional_forward_args=(torch.tensor(rows, device=dev),),
                         n_steps=opts["steps"], method=opts["method"], internal_batch_size=max(1, len(rows)) * 4)
        out[s] = a.detach().cpu()
    return out


def _activations(t: Targets, rows) -> dict:
    with torch.no_grad():
        acts = t.activations(rows)
    return {s: acts[s].abs().cpu() * (t.value_norms[s][None] if s in t.value_norms else 1.0) for s in t.sites}


def _greedy(t: Targets, rows, opts, progress) -> dict:
    from ..data import Dataset
    from .ablate import greedy_flip

    if t.kind != "classifier":
        raise ConfigError("Greedy ablation localizes classifier examples; for sequences use hardconcrete, slimming, "
                          "zero_out, ig or activations.")
    x, y = t.extra["x"][rows], t.extra["y"][rows]
    n = len(rows)
    data = opts.get("data")
    if data is None:
        data = Dataset(x=x, y=y, original_label=y, example_id=torch.arange(n), split=np.array(["train"] * n),
                       group=np.array(["noisy"] * n), num_classes=int(t.extra.get("num_classes", int(y.max()) + 1)))
        eids = list(range(n))
    else:
        eids = [t.ids[r] for r in rows]
    res = greedy_flip(t.model, data, eids, layers=t.sites, max_units=opts.get("max_units", 64), eval_size=0,
                      progress=progress)
    out = {s: torch.zeros(n, k) for s, k in zip(t.sites, t.sizes)}
    by_id = {int(r.example_id): r for r in res.itertuples()}
    for i, e in enumerate(eids):
        for order, u in enumerate(by_id[int(e)].units):
            layer, idx = u.rsplit(":", 1)
            out[layer][i, int(idx)] = 1.0 / (order + 1)
    return out


def localize(targets: Targets, method: str = "hardconcrete", joint: bool = False, batched: bool = True,
             seed: int = 0, progress: bool = False, **options) -> pd.DataFrame:
    """Rank the neurons of ``targets`` (:func:`classifier_targets` or :func:`sequence_targets`) by ``method``
    (module docstring). Returns a result, one row per target and neuron: ``target`` (the target's id),
    ``layer`` (site name), ``neuron``, ``score``, ``rank`` (0 = most responsible, within the target);
    with ``joint`` one set of rows with ``target = "all"``. ``options`` override :data:`DEFAULTS` (mask
    methods: ``lr, lam, stop, max_steps`` and, for hardconcrete, ``mask_p, beta``; ig: ``steps, method``;
    greedy: ``data`` (the training set, to draw its kept batch from) and ``max_units``). ``attrs["settings"]``
    holds the settings and ``attrs["seconds"]`` the time taken; the mask methods add ``steps`` per target."""
    choice("method", method, METHODS)
    opts = {**DEFAULTS.get(method, {}), **options}
    unknown = set(options) - set(DEFAULTS.get(method, {})) - ({"data", "max_units"} if method == "greedy" else set())
    if unknown:
        raise ConfigError(f"Unknown option(s) {sorted(unknown)} for {method}; valid: "
                          f"{sorted(DEFAULTS.get(method, {})) + (['data', 'max_units'] if method == 'greedy' else [])}.")
    for k in ("lr", "lam", "beta"):
        if k in opts:
            number(k, opts[k], lo=0.0, lo_open=True)
    if "stop" in opts:
        number("stop", opts["stop"], lo=0.0, hi=1.0, lo_open=True)
    if "mask_p" in opts:
        number("mask_p", opts["mask_p"], lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    if "max_steps" in opts:
        number("max_steps", opts["max_steps"], lo=1, integer=True)
    model = targets.model
    require_eval(model, "Localization")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = list(range(targets.n))
    t0 = time.perf_counter()
    extra: dict = {}
    with _frozen(model):
        if method in MASK_METHODS:
            if joint or batched:
                sc, extra = _mask_method(targets, rows, method, opts, seed, joint, progress)
            else:
                parts = [_mask_method(targets, [r], method, opts, seed, False, False) for r in
                         tqdm(rows, desc=method, disable=not progress, leave=False)]
                sc = {s: torch.cat([p[0][s] for p in parts]) for s in targets.sites}
                extra = {"steps": [p[1]["steps"][0] for p in parts],
                         "reached_stop": [p[1]["reached_stop"][0] for p in parts]}
        elif method == "zero_out":
            sc = _zero_out(targets, rows, progress)
        elif method == "ig":
            sc = _ig(targets, rows, opts, progress)
        elif method == "activations":
            sc = _activations(targets, rows)
        elif method == "greedy":
            sc = _greedy(targets, rows, opts, progress)
        else:
            g = torch.Generator().manual_seed(seed)
            sc = {s: torch.rand(len(rows), k, generator=g) for s, k in zip(targets.sites, targets.sizes)}
    seconds = time.perf_counter() - t0
    for k, v in model.state_dict().items():  # the model is never modified
        if not torch.equal(v, before[k]):
            raise RuntimeError(f"Localization changed {k}; this is a bug in memloc.")
    if joint and method not in MASK_METHODS:
        sc = {s: v.mean(0, keepdim=True) for s, v in sc.items()}
    ids = ["all"] if joint else targets.ids
    df = scores_frame(sc, targets.sites, ids)
    settings = {"method": method, "kind": targets.kind, "layers": targets.sites, "n_targets": targets.n,
                "joint": joint, "batched": batched, "seed": seed,
                **{k: v for k, v in opts.items() if k != "data"}}
    res = make_result(df, **settings)
    res.attrs["seconds"] = seconds
    res.attrs.update({k: v for k, v in extra.items()})
    return res


def scores_frame(sc: dict, sites: Sequence[str], ids: Sequence) -> pd.DataFrame:
    """Long table ``target, layer, neuron, score, rank`` from ``{site: [n_targets, size]}`` scores (rank over all
    sites of a target; ties broken by layer order then neuron)."""
    full = torch.cat([sc[s].float() for s in sites], 1).numpy()
    layer = np.concatenate([[s] * sc[s].shape[1] for s in sites])
    neuron = np.concatenate([np.arange(sc[s].shape[1]) for s in sites])
    parts = []
    for i, tid in enumerate(ids):
        order = np.argsort(-full[i], kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        parts.append(pd.DataFrame({"target": [tid] * len(order), "layer": layer, "neuron": neuron, "score": full[i],
                                   "rank": rank}))
    return pd.concat(parts, ignore_index=True)


def top_units(table: pd.DataFrame, fraction: float | None = None, k: dict | int | None = None,
              target=None) -> dict[str, list[int]]:
    """The top neurons of one target's ranking, **per layer**: ``fraction`` of each layer's neurons (at least
    one), or ``k`` per layer (an int, or ``{layer: count}``). ``{layer: [neuron, ...]}``."""
    df = table if target is None else table[table.target == target]
    if df.target.nunique() != 1:
        raise ConfigError(f"Pick one target; the table holds {df.target.nunique()}.")
    out = {}
    for layer, g in df.groupby("layer", sort=False):
        if fraction is not None:
            kk = max(1, int(round(fraction * len(g))))
        elif isinstance(k, dict):
            kk = int(k.get(layer, 0))
        else:
            kk = int(k)
        out[layer] = g.sort_values(["score", "neuron"], ascending=[False, True]).neuron.iloc[:kk].astype(int).tolist()
    return out
