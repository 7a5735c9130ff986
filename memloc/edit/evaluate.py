"""Evaluation of edits on plain edit records: CounterFact's and zsRE's metrics, and the testbed's benchmark.

Edits are :class:`~memloc.data.records.EditRecord` s: from CounterFact or zsRE files
(:func:`memloc.data.records.load_requests`) or from the synthetic fact world (:func:`make_requests`). Every prompt
is scored through the :class:`~memloc.models.lm.LM` handle (multi-token targets, teacher-forced; the handle's BOS
policy). Per record (kmeng01/rome's ``eval_utils_counterfact`` conventions: a target's score is its mean token
log-probability, targets with a leading space):

- ``es`` (efficacy success): P(new) > P(true) on the rewrite prompt; ``em``: mean of P(new) - P(true) (P = the
  exponentiated mean token log-probability); ``top1``: greedy decoding gives the new target.
- ``ps`` / ``pm``: the same on the paraphrase prompts.
- ``ns`` / ``nm``: P(own) > P(new) on the neighbourhood prompts (own = their target: CounterFact's
  ``target_true``, zsRE's ``loc_ans``), and the mean of P(own) - P(new); ``neighbour_acc``: greedy decoding still
  gives their own target.
- ``efficacy_acc``, ``generalization_acc``, ``specificity_acc``: zsRE's token accuracies (the fraction of the new
  target's tokens that are the argmax on the rewrite and paraphrase prompts; of ``loc_ans``'s on ``loc``).
- ``other_acc``: the subject's other facts still decoded (records that list them: the testbed's).
- ``fluency``: ROME's generation entropy (weighted bi- and tri-gram entropy of the words of greedy
  continuations, log base 2, x100) of the generation prompts; ``consistency``: TF-IDF cosine between those
  continuations and the record's ``reference_texts`` (when a file has them).

``S`` is the harmonic mean of ES, PS and NS (percent). :func:`batch_scores` adds ``unedited_acc`` for a batch of
edits applied together: greedy accuracy on facts no edit touched.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..results import make_result


__all__ = ["make_requests", "world_facts_outside", "request_scores", "batch_scores", "summarize",
           "generation_entropy", "ngram_entropy", "single_edits", "many_edits", "compare_editors", "evaluate_requests",
           "rome_by_layer", "trace_vs_edit",
           "TESTBED_MEMIT", "USUAL"]

USUAL = {"counterfact": ["es", "ps", "ns", "em", "pm", "nm", "S", "fluency", "consistency"],
         "zsre": ["efficacy_acc", "generalization_acc", "specificity_acc"],
         "memloc": ["es", "top1", "ps", "ns", "neighbour_acc", "other_acc", "unedited_acc", "fluency", "S"]}
"""The metric names each format is usually reported with."""


def _lm(lm):
    from ..models.lm import as_lm
    return as_lm(lm)


def make_requests(world, n: int = 100, seed: int = 0, template: int = 0, distinct_subjects: bool = True,
                  n_neighbours: int = 5, exclude_edited: bool = False, subjects: Sequence[str] | None = None):
    """``n`` seeded :class:`~memloc.data.records.EditRecord` s on a fact world: random facts, each rewritten to a
    random other object of its relation on training template ``template``; paraphrases are the relation's held-out
    templates (also the generation prompts), neighbours ``n_neighbours`` other subjects of the relation (those
    sharing the true object first, as in CounterFact; never one whose object is the new one; with
    ``exclude_edited``, never a subject any of the ``n`` records edits: for edits applied together), ``other``
    the subject's facts of the other relations, reference texts (for consistency) up to five training sentences of
    other subjects whose object is the new one. ``distinct_subjects`` draws at most one fact per subject;
    ``subjects`` draws only facts of those subjects (the others stay unedited: neighbours and preserved facts for
    sequential editing). The same seed gives the same requests with or without ``exclude_edited``; only
    neighbours differ."""
    from ..data.records import EditRecord
    from ..validate import number

    number("n", n, lo=1, integer=True)
    number("n_neighbours", n_neighbours, lo=0, integer=True)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(world.facts))
    allowed = None if subjects is None else set(subjects)
    if allowed is not None and allowed - set(world.subjects):
        raise ValueError(f"{len(allowed - set(world.subjects))} of the given subjects are not in the world, e.g. "
                         f"{sorted(allowed - set(world.subjects))[:3]}.")
    picked, seen = [], set()
    for i in order:
        f = world.facts[int(i)]
        if allowed is not None and f.subject not in allowed:
            continue
        if distinct_subjects and f.subject in seen:
            continue
        seen.add(f.subject)
        objs, train, _ = world.relations[f.relation]
        new = [o for o in objs if o != f.object][int(rng.integers(len(objs) - 1))]
        picked.append((f, new))
        if len(picked) == n:
            break
    else:
        raise ValueError(f"The world has only {len(picked)} {'subjects' if distinct_subjects else 'facts'}; "
                         f"asked for {n} requests.")
    edited = {f.subject for f, _ in picked} if exclude_edited else set()
    out = []
    for f, new in picked:
        objs, train, held = world.relations[f.relation]
        nrng = np.random.default_rng(seed + world.subjects.index(f.subject))
        same = [g for g in world.facts if g.relation == f.relation and g.subject != f.subject
                and g.subject not in edited]
        first = [g for g in same if g.object == f.object]
        rest = [g for g in same if g.object not in (f.object, new)]
        nb = [first[i] for i in nrng.permutation(len(first))[:n_neighbours]]
        nb += [rest[i] for i in nrng.permutation(len(rest))[:n_neighbours - len(nb)]]
        others = [g for g in world.facts if g.subject == f.subject and g.relation != f.relation]
        refs = [g for g in world.facts if g.relation == f.relation and g.object == new][:5]
        out.append(EditRecord(
            prompt=train[template].replace("{s}", "{}"), subject=f.subject, target_new=new, target_true=f.object,
            paraphrase_prompts=tuple(world.prompts(f, "heldout")),
            neighborhood_prompts=tuple(world.prompts(g)[0] for g in nb), neighborhood_targets=tuple(g.object for g in nb),
            generation_prompts=tuple(world.prompts(f, "heldout")),
            other_prompts=tuple(world.prompts(g)[0] for g in others), other_targets=tuple(g.object for g in others),
            reference_texts=tuple(f"{world.prompts(g)[0]} {g.object}." for g in refs), format="memloc", case_id=f"{f.subject}/{f.relation}", relation=f.relation))
    return out


def world_facts_outside(world, records) -> list[tuple[str, str]]:
    """``(first training prompt, object)`` of every fact whose subject no record edits: the facts
    :func:`batch_scores` checks for ``unedited_acc``."""
    edited = {r.subject for r in records}
    return [(world.prompts(f)[0], f.object) for f in world.facts if f.subject not in edited]


def ngram_entropy(tokens: Sequence) -> float:
    """ROME's n-gram entropy of one text: mean of (2/3) H_2 and (4/3) H_3 (bits)."""
    out = []
    for n, w in ((2, 2 / 3), (3, 4 / 3)):
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        if not grams:
            out.append(0.0)
            continue
        f = np.array(list(grams.values()), dtype=float)
        f /= f.sum()
        out.append(w * float(-(f * np.log2(f)).sum()))
    return float(np.mean(out))


def _continuations(lm, prompts: Sequence[str], max_len: int | None = None) -> list[str]:
    n_ctx = getattr(lm.cfg, "n_ctx", None) or 1024
    max_len = max_len or min(n_ctx, 100)
    out = []
    for p in prompts:
        ids = lm.encode(p)
        n = max(0, min(max_len, n_ctx) - len(ids))
        out.append(lm.decode(lm.generate([ids], n)[0]) if n else "")
    return out


def generation_entropy(lm, prompts: Sequence[str], max_len: int | None = None) -> float:
    """Mean n-gram entropy (x100) of the words of greedy continuations of ``prompts``, up to ``max_len`` tokens in
    all (default: 100 or the model's context length, if shorter; ROME generates 100)."""
    lm = _lm(lm)
    texts = _continuations(lm, prompts, max_len)
    return 100 * float(np.mean([ngram_entropy(t.split()) for t in texts])) if texts else float("nan")


def _consistency(generated: Sequence[str], references: Sequence[str]) -> float:
    """TF-IDF cosine between the generated texts and the reference texts (ROME's reference score, with the IDF
    fitted on these texts rather than on Wikipedia)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not references or not any(g.strip() for g in generated):
        return float("nan")
    vec = TfidfVectorizer().fit(list(references) + list(generated))
    a = np.asarray(vec.transform([" ".join(generated)]).todense())[0]
    b = np.asarray(vec.transform([" ".join(references)]).todense())[0]
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den else float("nan")


def request_scores(lm, records, fluency: bool = False) -> pd.DataFrame:
    """Scores of each record on the model as it is now (module docstring), one row per record."""
    lm = _lm(lm)
    prompts, targets, key = [], [], []
    for j, r in enumerate(records):
        true = r.target_true
        for kind, ps, owns in (("rewrite", [r.text], [true]),
                               ("paraphrase", list(r.paraphrase_prompts), [true] * len(r.paraphrase_prompts)),
                               ("neighbour", list(r.neighborhood_prompts),
                                list(r.neighborhood_targets) or [true] * len(r.neighborhood_prompts)),
                               ("other", list(r.other_prompts), list(r.other_targets))):
            for p, own in zip(ps, owns):
                prompts.append(p)
                targets.append(r.target_new)
                key.append((j, kind, "new"))
                if own is not None:
                    prompts.append(p)
                    targets.append(own)
                    key.append((j, kind, "own"))
    s = lm.score(prompts, targets) if prompts else {}
    table = pd.DataFrame(key, columns=["record", "kind", "which"])
    for c in ("mean_logprob", "exact", "token_acc"):
        table[c] = s[c]
    table["p"] = np.exp(table.mean_logprob)
    out = []
    for j, r in enumerate(records):
        t = table[table.record == j]

        def pair(kind):
            a = t[(t.kind == kind) & (t.which == "new")].reset_index(drop=True)
            b = t[(t.kind == kind) & (t.which == "own")].reset_index(drop=True)
            return a, b

        rw_new, rw_own = pair("rewrite")
        pa_new, pa_own = pair("paraphrase")
        nb_new, nb_own = pair("neighbour")
        ot_new, ot_own = pair("other")
        nan = float("nan")

        def mean(x):
            return float(np.mean(x)) if len(x) else nan

        row = {"case_id": r.case_id, "subject": r.subject, "relation": r.relation, "true": r.target_true,
               "new": r.target_new, "format": r.format,
               "es": mean(rw_new.p.values > rw_own.p.values) if len(rw_own) else nan,
               "em": mean(rw_new.p.values - rw_own.p.values) if len(rw_own) else nan,
               "top1": mean(rw_new.exact.values),
               "ps": mean(pa_new.p.values > pa_own.p.values) if len(pa_own) else nan,
               "pm": mean(pa_new.p.values - pa_own.p.values) if len(pa_own) else nan,
               "ns": mean(nb_own.p.values > nb_new.p.values) if len(nb_own) else nan,
               "nm": mean(nb_own.p.values - nb_new.p.values) if len(nb_own) else nan,
               "neighbour_acc": mean(nb_own.exact.values),
               "other_acc": mean(ot_own.exact.values),
               "efficacy_acc": mean(rw_new.token_acc.values),
               "generalization_acc": mean(pa_new.token_acc.values),
               "specificity_acc": mean(nb_own.token_acc.values)}
        if fluency:
            gp = list(r.generation_prompts)
            gen = _continuations(lm, gp) if gp else []
            row["fluency"] = 100 * float(np.mean([ngram_entropy(g.split()) for g in gen])) if gen else nan
            row["consistency"] = _consistency(gen, r.reference_texts) if r.reference_texts else nan
        out.append(row)
    return pd.DataFrame(out)


def batch_scores(lm, records, unedited: Sequence[tuple[str, str]] | None = None, fluency: bool = False) -> pd.DataFrame:
    """:func:`request_scores` plus ``unedited_acc``: greedy accuracy on ``unedited`` ``(prompt, target)`` pairs,
    facts no edit of the batch touches (the same value on every row; NaN without them)."""
    lm = _lm(lm)
    df = request_scores(lm, records, fluency)
    if unedited:
        s = lm.score([p for p, _ in unedited], [t for _, t in unedited])
        df["unedited_acc"] = float(s["exact"].mean())
    else:
        df["unedited_acc"] = float("nan")
    return df


def summarize(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per condition (``{name: request_scores frame}``): means in percent (fluency as is) and S."""
    rows = []
    cols = ["es", "top1", "ps", "ns", "em", "pm", "nm", "neighbour_acc", "other_acc", "unedited_acc",
            "efficacy_acc", "generalization_acc", "specificity_acc", "fluency", "consistency", "took"]
    for name, df in frames.items():
        row = {"condition": name, "n": len(df)}
        for c in cols:
            if c in df and df[c].notna().any():
                row[c] = float(df[c].astype(float).mean()) * (1 if c == "fluency" else 100)
        es, ps, ns = row.get("es", np.nan), row.get("ps", np.nan), row.get("ns", np.nan)
        row["S"] = 3 / (1 / max(es, 1e-9) + 1 / max(ps, 1e-9) + 1 / max(ns, 1e-9)) if not np.isnan([es, ps, ns]).any() \
            else float("nan")
        if "flag" in df:
            for f in ("did not take", "collapse"):
                row[f"flag_{f.replace(' ', '_')}"] = int((df.flag == f).sum())
        rows.append(row)
    return make_result(pd.DataFrame(rows).round(2))


_OUTCOME_COLS = ("rel_error", "nll_end", "nll_after", "took", "flag", "update_rel", "update_vs_typical",
                 "entropy_before", "entropy_after")


def single_edits(lm, records, layer: int, C: torch.Tensor | None = None, config=None, fluency: bool = False,
                 progress: bool = True) -> pd.DataFrame:
    """ROME each record on its own at ``layer``, score it, undo it (bit for bit) before the next one. Rows of
    :func:`request_scores` plus the edit's outcomes (``rel_error`` = |W'k - v*| / |v*|, ``nll_end``,
    ``nll_after``, ``took``, ``flag``, ``update_rel``, ``update_vs_typical``, entropies)."""
    from tqdm.auto import tqdm

    from .rome import rome

    lm = _lm(lm)
    rows = []
    for r in tqdm(records, desc=f"ROME layer {layer}", disable=not progress, leave=False):
        e = rome(lm, r.request(), layer, C, config)
        with e.applied(lm.model):
            row = request_scores(lm, [r], fluency=fluency)
        for c in _OUTCOME_COLS:
            row[c] = e.info.get(c)
        rows.append(row)
    return make_result(pd.concat(rows, ignore_index=True), method="rome", layer=layer,
                       covariance="identity" if C is None else f"data ({getattr(C, 'count', '?')} tokens)", **lm.settings)


def many_edits(lm, records, method: str = "memit", layers: Sequence[int] = (0, 1), C: dict | None = None,
               config=None, unedited: Sequence[tuple[str, str]] | None = None, progress: bool = True,
               fluency: bool = False) -> pd.DataFrame:
    """Apply all records together, score them with :func:`batch_scores`, restore the model. ``method="memit"``:
    one MEMIT batch over ``layers``; ``"sequential"``: one ROME edit after another at ``layers[0]``, each computed
    on the model edited so far (the way sequential ROME degrades in the MEMIT paper). Rows carry each edit's
    ``took`` / ``flag``."""
    import contextlib

    from tqdm.auto import tqdm

    from .rome import memit, rome

    lm = _lm(lm)
    if method not in ("memit", "sequential"):
        raise ValueError(f"method must be 'memit' or 'sequential'; got {method!r}.")
    reqs = [r.request() for r in records]
    outcomes = []
    with contextlib.ExitStack() as stack:
        if method == "memit":
            e = memit(lm, reqs, layers, C, config, progress=progress, outcomes=True)
            outcomes = e.info["edits"]
            stack.enter_context(e.applied(lm.model))
        else:
            Cl = (C or {}).get(layers[0])
            for r in tqdm(reqs, desc="sequential ROME", disable=not progress, leave=False):
                e = rome(lm, r, layers[0], Cl, config, outcomes=False)
                outcomes.append({"nll_end": e.info["nll_end"]})
                stack.enter_context(e.applied(lm.model))
        df = batch_scores(lm, records, unedited, fluency)
    for c in ("nll_end", "nll_after", "took", "flag"):
        vals = [o.get(c) for o in outcomes]
        if any(v is not None for v in vals):
            df[c] = vals
    return make_result(df, method=method, layers=list(layers) if method == "memit" else [layers[0]],
                       n_edits=len(records), covariance="data" if C else "identity", **lm.settings)


TESTBED_MEMIT = {"clamp_norm_factor": 4.0, "mom2_update_weight": 1000.0}
"""MEMIT settings for the tiny testbed: the original clamp (0.75 x |h|) stops the targets short of the new object
(mean target NLL 2.6 at layer 0), and lambda is on the scale of this model's key statistics (a sweep over 300-20000
on 100 edits: 1000 keeps 98% of unedited facts at 95% efficacy)."""


def compare_editors(lm, world, out=None, n: int = 100, layer: int = 0, memit_layers: Sequence[int] = (0,),
                    memit_config=None, seed: int = 0, n_neighbours: int = 5, fluency: bool = True,
                    progress: bool = True) -> pd.DataFrame:
    """The edit benchmark of the testbed on ``n`` seeded requests (distinct subjects): unedited; ROME at ``layer``
    with C from the training text and with C = I, one edit at a time (undone after each); the same edits all at
    once as one MEMIT batch over ``memit_layers`` and as sequential ROME. Returns the :func:`summarize` table (one
    row per condition). With ``out``, each condition's per-request table is saved there (``<condition>.parquet``)
    and reused when the command is run again, and ``summary.parquet`` and ``summary.png`` are written."""
    from pathlib import Path

    from ..results import load_result, save_result
    from .rome import EditConfig, key_second_moment

    lm = _lm(lm)
    records = make_requests(world, n, seed, n_neighbours=n_neighbours)  # single edits: CounterFact's neighbours
    together = make_requests(world, n, seed, n_neighbours=n_neighbours, exclude_edited=True)  # no edited neighbour
    unedited = world_facts_outside(world, records)
    text = world.training_text()
    memit_config = memit_config or EditConfig.memit(**TESTBED_MEMIT)
    cache: dict[int, torch.Tensor] = {}

    def C(l):
        if l not in cache:
            cache[l] = key_second_moment(lm, text, l)
        return cache[l]

    jobs = {
        "unedited": lambda: make_result(request_scores(lm, records, fluency=fluency), method="none"),
        f"rome_L{layer}_C_data": lambda: single_edits(lm, records, layer, C(layer), fluency=fluency, progress=progress),
        f"rome_L{layer}_C_identity": lambda: single_edits(lm, records, layer, None, fluency=fluency,
                                                          progress=progress),
        "unedited_batch": lambda: make_result(batch_scores(lm, together, unedited), method="none"),
        f"memit_{n}": lambda: many_edits(lm, together, "memit", memit_layers, {l: C(l) for l in memit_layers},
                                         memit_config, unedited, progress),
        f"sequential_rome_{n}": lambda: many_edits(lm, together, "sequential", [layer], {layer: C(layer)}, None,
                                                   unedited, progress),
    }
    frames = {}
    if out:
        from ..validate import mark_output
        mark_output(out, "edit")
    for name, job in jobs.items():
        path = Path(out) / f"{name}.parquet" if out else None
        if path is not None and path.exists():
            frames[name] = load_result(path)
            continue
        frames[name] = job()
        if path is not None:
            save_result(frames[name], path)
    table = summarize(frames)
    settings = {"n": n, "layer": layer, "memit_layers": list(memit_layers), "seed": seed,
                "n_neighbours": n_neighbours, "memit_config": {k: v for k, v in vars(memit_config).items()},
                "rome_config": vars(EditConfig()), "key_statistics": f"training text ({len(text)} sentences)",
                **lm.settings}
    table = make_result(table, **settings)
    if out:
        from ..analyses.plots import plot_edits, save_figure

        save_result(table, Path(out) / "summary.parquet")
        save_figure(plot_edits(table), Path(out) / "summary.png")
    return table


def evaluate_requests(lm, records, method: str = "rome", layer: int = 0, layers: Sequence[int] | None = None,
                      C: torch.Tensor | dict | None = None, config=None, fluency: bool = True,
                      progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Edit and evaluate user records (CounterFact / zsRE files): ``method="rome"`` (each record alone, undone
    after scoring) or ``"memit"`` (all at once over ``layers``). Returns ``(per_record, summary)``; the summary
    has the unedited model and the edited one, in percent, with the format's usual names in
    ``attrs["settings"]["usual"]``."""
    from .rome import EditConfig

    lm = _lm(lm)
    records = list(records)
    if not records:
        raise ValueError("No edit records given.")
    formats = sorted({r.format for r in records})
    before = request_scores(lm, records, fluency=fluency)
    if method == "rome":
        after = single_edits(lm, records, layer, C, config, fluency=fluency, progress=progress)
    elif method == "memit":
        Cd = C if isinstance(C, dict) or C is None else {l: C for l in (layers or [layer])}
        after = many_edits(lm, records, "memit", layers or [layer], Cd, config or EditConfig.memit(), None, progress,
                           fluency=fluency)
    else:
        raise ValueError(f"The 'method' parameter must be 'rome' or 'memit'. Got {method!r} instead.")
    table = summarize({"unedited": before, method: after})
    usual = list(dict.fromkeys(m for f in formats for m in USUAL.get(f, USUAL["memloc"])))
    return after, make_result(table, method=method, layer=layer, layers=list(layers or [layer]), formats=formats,
                              usual=usual, covariance="identity" if C is None else "data", n=len(records),
                              **lm.settings)


def rome_by_layer(lm, records, layers: Sequence[int] | None = None, C: dict | str | None = "data",
                  texts: Sequence[str] | None = None, config=None, progress: bool = True) -> pd.DataFrame:
    """ROME of every record alone at each of ``layers`` (default: all), undone after scoring: the rows of
    :func:`single_edits` with a ``layer`` column and the edit's ``seconds``. ``C``: ``"data"`` (the keys' second
    moment over ``texts``, computed once per layer), a ``{layer: C}`` dict, or ``None`` (identity)."""
    import time

    from .rome import key_second_moment

    lm = _lm(lm)
    layers = list(range(lm.cfg.n_layers) if layers is None else layers)
    if isinstance(C, str):
        if C != "data" or texts is None:
            raise ValueError("C='data' needs the texts the key statistics are computed on (texts=...).")
        C = {l: key_second_moment(lm, list(texts), l) for l in layers}
    frames = []
    for l in layers:
        t0 = time.perf_counter()
        df = single_edits(lm, records, l, (C or {}).get(l), config, progress=progress)
        df.insert(0, "layer", l)
        df["seconds"] = (time.perf_counter() - t0) / max(1, len(records))
        frames.append(df)
    return make_result(pd.concat(frames, ignore_index=True), method="rome", layers=layers,
                       covariance="identity" if not C else "data", n=len(records), **lm.settings)


def trace_vs_edit(lm, records, edits: pd.DataFrame, kind: str = "mlp", window: int = 1, samples: int = 10,
                  seed: int = 0, noise: float | None = None, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """Hase et al. (2023), "Does localization inform editing?": for each edited fact, causal tracing's indirect
    effect at the last subject token per layer (``kind`` outputs restored, ``window``) next to ROME's success when
    the edit is made at that layer (``edits``: :func:`rome_by_layer` on the same ``records``).

    Returns ``(per_layer, summary)``: rows ``case_id, layer, trace_ie, es, em, ps, pm, ns, edit_score`` where
    ``edit_score`` = (em + pm) / 2 (the rewrite and paraphrase margins P(new) - P(true)); ``summary`` has each
    fact's ``trace_peak`` and ``best_edit`` layer, the share of facts where they agree, the Pearson and Spearman
    correlation of ``trace_ie`` with ``edit_score`` over all (fact, layer) pairs and within facts (layer means
    removed), and the correlation of the two per-fact layers. Facts are traced on their true object whether or not
    the model predicts it (``only_known=False``), so every edited fact has a row."""
    from scipy import stats

    from ..locate.trace import trace_facts

    lm = _lm(lm)
    recs = list(records)
    facts = [{"prompt": r.prompt, "subject": r.subject, "target": r.target_true, "relation": r.case_id}
             for r in recs]
    tr = trace_facts(lm, facts, kind, samples, window, seed, only_known=False, progress=progress, noise=noise)
    last = tr[tr.bucket == "last subject"].groupby(["relation", "layer"]).ie.mean().rename("trace_ie").reset_index()
    last = last.rename(columns={"relation": "case_id"})
    e = edits[["case_id", "layer", "es", "em", "ps", "pm", "ns"]].copy()
    e["edit_score"] = (e.em + e.pm) / 2
    df = last.merge(e, on=["case_id", "layer"], how="inner")
    per_fact = df.groupby("case_id").apply(
        lambda g: pd.Series({"trace_peak": int(g.layer.values[np.argmax(g.trace_ie.values)]),
                             "best_edit": int(g.layer.values[np.argmax(g.edit_score.values)])}),
        include_groups=False)
    centred = df.assign(trace_ie=df.trace_ie - df.groupby("case_id").trace_ie.transform("mean"),
                        edit_score=df.edit_score - df.groupby("case_id").edit_score.transform("mean"))

    def corr(x, y, f):
        return float(f(x, y)[0]) if len(x) > 2 and np.std(x) > 0 and np.std(y) > 0 else float("nan")

    summary = {
        "n_facts": int(len(per_fact)), "kind": kind, "window": window, "samples": samples, "seed": seed,
        "noise": tr.attrs["settings"]["noise"],
        "trace_peak_counts": {int(k): int(v) for k, v in per_fact.trace_peak.value_counts().sort_index().items()},
        "best_edit_counts": {int(k): int(v) for k, v in per_fact.best_edit.value_counts().sort_index().items()},
        "agree": float((per_fact.trace_peak == per_fact.best_edit).mean()),
        "pearson_all": corr(df.trace_ie, df.edit_score, stats.pearsonr),
        "spearman_all": corr(df.trace_ie, df.edit_score, stats.spearmanr),
        "pearson_within_fact": corr(centred.trace_ie, centred.edit_score, stats.pearsonr),
        "peak_layer_correlation": corr(per_fact.trace_peak, per_fact.best_edit, stats.pearsonr),
    }
    return make_result(df, **summary, **lm.settings), summary
