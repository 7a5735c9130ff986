"""Sequential editing: N edits applied one after another (ROME, r-ROME) or in batches (MEMIT, AlphaEdit), each
computed on the model edited so far, evaluated every ``every`` edits on everything edited so far.

Why: single-edit benchmarks hide what happens to a model that is edited again and again: ROME's "disabling edits"
(model collapse after one edit, Gupta et al. 2024, fixed by r-ROME's consistent keys), MEMIT losing earlier edits and
unrelated knowledge as N grows, AlphaEdit's null-space projection keeping both (Fang et al. 2025).

One row per checkpoint (``checkpoints.parquet``), in percent where a rate:

- ``es`` / ``ps`` / ``top1``: efficacy, paraphrase and greedy top-1 of *all* edits so far (earlier edits can be
  overwritten or undone by later ones); ``es_last``: efficacy of the last batch alone;
- ``ns``: neighbourhood success of the edits so far (CounterFact's P(true) > P(new) on subjects never edited);
- ``specificity``: of the preserved facts (never edited) the unedited model decoded correctly, the share the edited
  model still decodes correctly: measured against the *unedited* model, not the model edited so far (the EasyEdit
  pitfall); ``preserved_acc``: their accuracy against the truth;
- ``fluency`` (ROME's generation entropy x100 of greedy continuations of the first ``fluency_n`` edits' generation
  prompts, the same prompts at every checkpoint from the one where they are all edited) and ``consistency``
  (TF-IDF cosine with the records' reference texts), where generation is possible;
- ``update_rel``: ``|W - W0|_F / |W0|_F`` of the accumulated update, largest over the edited layers; ``collapsed``:
  edits so far flagged ``collapse``.

One row per edit (``edits.parquet``): its batch, ``edit_norm`` (``|Delta W|_F`` of its batch over all layers),
``took`` (greedy decoding gives the new target right after its batch), entropies before / after and ``flag``
(of a 50-token greedy continuation of its rewrite prompt; ``collapse`` when the entropy fell below half: a disabling
edit), ``nll_end``, and for ROME the
update's ``denominator`` ``k^T u``.

Resumable: ``out`` holds the accumulated weight deltas (and AlphaEdit's earlier keys) at the last checkpoint; a rerun
with the same settings continues from there, other settings are refused unless ``overwrite``. The model is left as it
was (every weight restored bit for bit) when the function returns or fails.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..results import make_result

__all__ = ["METHODS", "sequential_edits", "plot_sequential", "sequential_requests", "reference_templates"]

METHODS = ("rome", "r-rome", "memit", "alphaedit")
METRICS = ("es", "ps", "ns", "specificity", "fluency", "update_rel")


def _lm(lm):
    from ..models.lm import as_lm
    return as_lm(lm)


def sequential_requests(world, n: int, seed: int = 0, hold_out: float = 0.2, n_neighbours: int = 5):
    """``(records, preserved)`` for sequential editing on a fact world: a seeded ``hold_out`` share of the subjects
    is never edited (their facts are the preserved facts, ``(prompt, object)``, and every record's neighbours);
    ``n`` distinct facts of the other subjects are rewritten (several facts of one subject may be)."""
    from ..validate import number

    number("hold_out", hold_out, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    rng = np.random.default_rng(seed + 7919)
    subjects = list(world.subjects)
    held = {subjects[int(i)] for i in rng.permutation(len(subjects))[:max(1, int(round(hold_out * len(subjects))))]}
    editable = [s for s in subjects if s not in held]
    n_facts = sum(f.subject in set(editable) for f in world.facts)
    if n > n_facts:
        raise ValueError(f"The world has {n_facts} facts of subjects outside the held-out {len(held)} "
                         f"({hold_out:.0%}); asked for {n} sequential edits. Use a larger world (more people) or fewer "
                         "edits.")
    from .evaluate import make_requests

    records = make_requests(world, n, seed, distinct_subjects=False, n_neighbours=n_neighbours, exclude_edited=True,
                            subjects=editable)
    preserved = [(world.prompts(f)[0], f.object) for f in world.facts if f.subject in held]
    return records, preserved


MEMIT_STARTS = ("The", "Therefore", "Because", "I", "You")


def reference_templates(lm, method: str, seed: int = 0) -> tuple[str, ...]:
    """The reference implementations' context templates for ``method``: kmeng01/rome's 21 (``"{}"`` and 20 prefixes
    sampled from BOS) for ROME and r-ROME; MEMIT's and AlphaEdit's 6 (5 sampled from :data:`MEMIT_STARTS`, or from
    BOS with memloc's word tokenizer, whose vocabulary may lack those words) for the batch methods."""
    from .rome import context_templates

    if method in ("rome", "r-rome"):
        return context_templates(lm, seed=seed)
    return context_templates(lm, ((10, 5),), starts=None if getattr(lm, "word", False) else MEMIT_STARTS, seed=seed)


def _fingerprint(params: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for n in sorted(params):
        h.update(n.encode())
        h.update(params[n].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _entropies(lm, texts: Sequence[str], max_len: int = 50) -> list[float]:
    """ROME's n-gram entropy (x100) of a greedy continuation of each text up to ``max_len`` tokens in all (the
    per-edit collapse check: shorter than the checkpoints' 100-token fluency), batched."""
    from .evaluate import ngram_entropy

    if not texts:
        return []
    n_ctx = getattr(lm.cfg, "n_ctx", None) or 1024
    ids = [lm.encode(t) for t in texts]
    n = max(0, min(max_len, n_ctx) - max(len(q) for q in ids))
    if n == 0:
        return [float("nan")] * len(texts)
    gens = lm.generate(ids, n)
    return [100 * ngram_entropy(lm.decode(g).split()) for g in gens]


def sequential_edits(lm, records, method: str = "memit", n: int | None = None, batch: int | None = None,
                     every: int | None = None, layers: Sequence[int] | None = None, C: dict | None = None,
                     config=None, preserved: Sequence[tuple[str, str]] = (), threshold: float = 2e-2,
                     fluency_n: int = 20, out: str | Path | None = None, overwrite: bool = False,
                     until: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Apply the first ``n`` of ``records`` (:class:`~memloc.data.records.EditRecord`, e.g. from
    :func:`sequential_requests`) in order, ``batch`` at a time, evaluating every ``every`` edits (module
    docstring). Returns the checkpoint table (``attrs["edits"]``: the per-edit table; ``attrs["settings"]``).

    ``method``: ``"rome"`` (kmeng01/rome's keys), ``"r-rome"`` (``keys="prefix"``), each one edit at a time at
    ``layers[0]``; ``"memit"`` or ``"alphaedit"`` (batches of ``batch``, default 100) over ``layers``. ``C``:
    ``{layer: key second moment}`` (needed for AlphaEdit's null space; ROME and MEMIT use the identity where
    missing). ``config``: an :class:`~memloc.edit.rome.EditConfig` (default: ROME's, or MEMIT's for the batch
    methods; r-ROME sets ``keys="prefix"``). ``threshold``: AlphaEdit's null-space threshold. ``preserved``:
    ``(prompt, target)`` facts no record edits (specificity). ``out``: a folder to resume from and write
    ``checkpoints.parquet``, ``edits.parquet`` and ``sequential.png`` into. ``until``: stop at the first checkpoint
    at or after this many edits (a long sequence in several sittings: a later call with the same settings and a
    larger ``until``, or none, continues from there; not a setting)."""
    import dataclasses

    from tqdm.auto import tqdm

    from ..validate import ConfigError, choice, number
    from .evaluate import _consistency, _continuations, ngram_entropy, request_scores
    from .rome import EditConfig, alphaedit, memit, mlp_out_weight, null_space, rome

    lm = _lm(lm)
    model = lm.model
    choice("method", method, METHODS)
    records = list(records)
    n = len(records) if n is None else n
    number("n", n, lo=1, hi=len(records), integer=True)
    single = method in ("rome", "r-rome")
    if single and batch not in (None, 1):
        raise ConfigError(f"{method} edits one fact at a time; batch must be 1 (got {batch}). Use memit or alphaedit "
                          "for batches.")
    batch = 1 if single else (100 if batch is None else batch)
    number("batch", batch, lo=1, integer=True)
    every = max(batch, n // 10) if every is None else every
    number("every", every, lo=1, integer=True)
    number("until", until, lo=1, integer=True, none_ok=True)
    if every % batch:
        raise ConfigError(f"every ({every}) must be a multiple of batch ({batch}).")
    stop = n if until is None else min(n, -(-until // every) * every)  # the first checkpoint at or after until
    layers = [int(l) for l in (layers if layers is not None else [0])]
    if single:
        layers = layers[:1]
    for l in layers:
        if not 0 <= l < lm.cfg.n_layers:
            raise ConfigError(f"Layer {l} is not a layer of this {lm.cfg.n_layers}-layer model.")
    C = dict(C or {})
    if method == "alphaedit" and set(layers) - set(C):
        raise ConfigError(f"AlphaEdit needs C for every edited layer ({layers}); got C for {sorted(C)}.")
    cfg = config or (EditConfig() if single else EditConfig.memit())
    if method == "r-rome":
        cfg = dataclasses.replace(cfg, keys="prefix")
    records = records[:n]
    preserved = list(preserved)

    names = [mlp_out_weight(model, l)[0] for l in layers]
    params = dict(model.named_parameters())
    W0 = {nm: params[nm].detach().clone() for nm in names}
    settings = {"method": method, "n": n, "batch": batch, "every": every, "layers": layers,
                "config": dataclasses.asdict(cfg), "threshold": threshold if method == "alphaedit" else None,
                "covariance": {str(l): f"data ({getattr(C[l], 'count', '?')} tokens)" for l in sorted(C) if l in layers},
                "records": hashlib.sha1(repr([(r.case_id, r.prompt, r.subject, r.target_new) for r in records])
                                        .encode()).hexdigest()[:16],
                "preserved": len(preserved), "fluency_n": fluency_n, **lm.settings, "weights": _fingerprint(W0)}

    space = null_space({l: C[l] for l in layers}, threshold) if method == "alphaedit" else None
    ckpts: list[dict] = []
    rows: list[dict] = []
    done = 0
    acc = {nm: torch.zeros_like(W0[nm]) for nm in names}
    if out is not None:
        done, acc, ckpts, rows = _resume(out, settings, overwrite, acc, space)

    def set_weights():
        with torch.no_grad():
            for nm in names:
                params[nm].copy_(W0[nm] + acc[nm])

    # the unedited model's answers on the preserved facts and its fluency
    kept_prompts, kept_targets = [p for p, _ in preserved], [t for _, t in preserved]
    base_ok = lm.score(kept_prompts, kept_targets)["exact"] if preserved else None
    flu_recs = records[:fluency_n]
    flu_prompts = [p for r in flu_recs for p in r.generation_prompts[:1]]

    def checkpoint(k: int, t_edit: float, last: Sequence):
        df = request_scores(lm, records[:k])
        last_df = df.iloc[-len(last):]
        row = {"method": method, "n_edits": k, "es": 100 * df.es.mean(), "ps": 100 * df.ps.mean(),
               "top1": 100 * df.top1.mean(), "ns": 100 * df.ns.mean(), "other_acc": 100 * df.other_acc.mean(),
               "es_last": 100 * last_df.es.mean()}
        if preserved:
            now = lm.score(kept_prompts, kept_targets)["exact"]
            row["specificity"] = 100 * float(now[base_ok].mean()) if base_ok.any() else float("nan")
            row["preserved_acc"] = 100 * float(now.mean())
        if flu_prompts:
            gen = _continuations(lm, flu_prompts)
            row["fluency"] = 100 * float(np.mean([ngram_entropy(g.split()) for g in gen]))
            refs = [t for r in flu_recs for t in r.reference_texts]
            row["consistency"] = 100 * _consistency(gen, refs) if refs else float("nan")
        row["update_rel"] = max(float(acc[nm].norm() / W0[nm].norm()) for nm in names)
        row["collapsed"] = int(sum(r_["flag"] == "collapse" for r_ in rows))
        row["seconds_editing"] = t_edit
        return row

    t_total = sum(r_.get("seconds", 0.0) for r_ in rows)
    bar = tqdm(total=stop, initial=min(done, stop), desc=f"sequential {method}", disable=not progress)
    try:
        set_weights()
        while done < stop:
            chunk = records[done:done + batch]
            reqs = [r.request() for r in chunk]
            before = _entropies(lm, [r.text for r in chunk])
            t0 = time.perf_counter()
            if single:
                e = rome(lm, reqs[0], layers[0], C.get(layers[0]), cfg, outcomes=False)
            elif method == "memit":
                e = memit(lm, reqs, layers, {l: C[l] for l in layers if l in C} or None, cfg, outcomes=False)
            else:
                e = alphaedit(lm, reqs, layers, space, cfg, outcomes=False)
            secs = time.perf_counter() - t0
            with torch.no_grad():
                for nm, d in e.deltas.items():
                    acc[nm] += d.to(acc[nm].dtype)
            set_weights()
            if space is not None:
                space.remember(e)
            t_total += secs
            s = lm.score([r.text for r in chunk], [r.target_new for r in chunk])
            after = _entropies(lm, [r.text for r in chunk])
            norm = float(sum(d.double().norm() ** 2 for d in e.deltas.values()) ** 0.5)
            nll = [e.info["nll_end"]] if single else [x[-1]["nll"] for x in e.info["losses"]]
            for j, r in enumerate(chunk):
                took = bool(s["exact"][j])
                collapse = before[j] > 0 and after[j] < 0.5 * before[j]
                rows.append({"edit": done + j, "case_id": r.case_id, "batch": done // batch, "edit_norm": norm,
                             "took": took, "entropy_before": before[j], "entropy_after": after[j],
                             "flag": "collapse" if collapse else "ok" if took else "did not take",
                             "nll_end": float(nll[j]), "denominator": e.info.get("denominator", float("nan")),
                             "seconds": secs / len(chunk)})
            done += len(chunk)
            bar.update(len(chunk))
            if done % every == 0 or done == n:
                ckpts.append(checkpoint(done, t_total, chunk))
                if out is not None:
                    _save(out, settings, done, acc, ckpts, rows, space)
        bar.close()
    finally:
        with torch.no_grad():
            for nm in names:
                params[nm].copy_(W0[nm])
    table = make_result(pd.DataFrame(ckpts).round(3), **settings)
    table.attrs["edits"] = pd.DataFrame(rows)
    if space is not None:
        table.attrs["settings"]["nullspace_dims"] = {str(l): space.dims[l] for l in layers}
        table.attrs["settings"]["key_statistics_bytes"] = space.nbytes()
    if out is not None:
        from ..analyses.plots import save_figure

        save_figure(plot_sequential({method: table}), Path(out) / "sequential.png")
    return table


def _save(out, settings, done, acc, ckpts, rows, space) -> None:
    """Commit a checkpoint: the weights' state file first (named by the edit count), then the record that points to
    it, then the tables; older state files are removed last. A kill at any point leaves a consistent record."""
    from safetensors.torch import save_file

    from ..results import atomic_path, save_result, write_json

    out = Path(out)
    tensors = {f"delta.{k}": v.detach().cpu().contiguous() for k, v in acc.items()}
    if space is not None:
        tensors |= {f"previous.{l}": v.contiguous() for l, v in space.previous.items()}
    state = out / f"state_{done}.safetensors"
    with atomic_path(state) as tmp:
        save_file(tensors, str(tmp))
    write_json({"settings": settings, "done": done, "state": state.name, "checkpoints": ckpts, "edits": rows,
                "n_previous": space.n_previous if space is not None else 0}, out / "progress.json")
    save_result(make_result(pd.DataFrame(ckpts), **settings), out / "checkpoints.parquet")
    save_result(make_result(pd.DataFrame(rows), **settings), out / "edits.parquet")
    for old in out.glob("state_*.safetensors"):
        if old.name != state.name:
            old.unlink(missing_ok=True)


def _resume(out, settings, overwrite, acc, space):
    """``(done, acc, checkpoints, edit rows)`` from ``out`` (claimed for ``settings``)."""
    from safetensors.torch import load_file

    from ..results import read_json
    from ..validate import claim_output

    out = Path(out)
    diff = claim_output(out, "sequential edits", settings, overwrite=overwrite)
    prog = out / "progress.json"
    if diff or not prog.exists():
        for stale in list(out.glob("state_*.safetensors")) + [prog]:
            stale.unlink(missing_ok=True)
        return 0, acc, [], []
    p = read_json(prog)
    t = load_file(str(out / p["state"]))
    acc = {k: t[f"delta.{k}"].to(v.dtype) for k, v in acc.items()}
    if space is not None:
        for l in space.previous:
            space.previous[l] = t[f"previous.{l}"].double()
        space.n_previous = int(p.get("n_previous", 0))
    return int(p["done"]), acc, list(p["checkpoints"]), list(p["edits"])


def plot_sequential(tables: dict[str, pd.DataFrame]):
    """One panel per metric (efficacy, paraphrase, neighbourhood, specificity against the unedited model, fluency,
    relative norm of the accumulated update) against the number of edits, one line per method."""
    import matplotlib.pyplot as plt

    titles = {"es": "efficacy (all edits so far) %", "ps": "paraphrase %", "ns": "neighbourhood %",
              "specificity": "preserved facts kept %", "fluency": "fluency (entropy x100)",
              "update_rel": "|W - W0| / |W0|"}
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, m in zip(axes.flat, METRICS):
        for name, t in tables.items():
            if m in t and len(t):
                ax.plot(t.n_edits, t[m], marker="o", ms=3, label=name)
        ax.set_title(titles[m], fontsize=10)
        ax.set_xlabel("edits")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    first = next(iter(tables.values()))
    st = first.attrs.get("settings", {})
    fig.suptitle(f"sequential editing: layers {st.get('layers')}, batch {st.get('batch')} (ROME: 1)", fontsize=11)
    fig.tight_layout()
    return fig
