"""CounterFact-style evaluation of edits on a fact world (Meng et al. 2022, section 3 of the reference notes).

A request rewrites a fact ``(subject, relation) -> object`` to a new object of the same relation, on the
relation's first training template. Per request (probabilities of the next token after each prompt):

- ``es`` (efficacy): P(new) > P(true) on the rewrite prompt; ``top1``: the new object is the top prediction;
  ``em``: P(new) - P(true).
- ``ps`` (paraphrase): the same on the relation's held-out templates (never in the training text), averaged.
- ``ns`` (neighbourhood specificity): on ``n_neighbours`` other subjects of the same relation (those sharing the true
  object first, as in CounterFact; never one whose object is the new one), P(their own object) > P(new);
  ``neighbour_acc``: their own object is still the top prediction.
- ``other_acc``: the edited subject's facts of the other relations are still the top prediction.
- ``fluency``: ROME's generation entropy (weighted bi- and tri-gram entropy, log base 2, x100) of greedy
  continuations of the subject's held-out prompts up to the context length.

``S`` is the harmonic mean of ES, PS and NS (in percent, as in the paper). For a batch of edits applied together
(MEMIT, or sequential ROME), :func:`batch_scores` also reports ``unedited_acc``: the accuracy on every fact whose
subject was not edited.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..analyses.lm import next_token_logprobs
from ..results import make_result
from .rome import Request

__all__ = ["make_requests", "request_scores", "batch_scores", "summarize", "generation_entropy", "ngram_entropy"]


def make_requests(world, n: int = 100, seed: int = 0, template: int = 0, distinct_subjects: bool = True):
    """``n`` seeded ``(fact, Request)`` pairs: random facts, each rewritten to a random other object of its relation
    on training template ``template``. ``distinct_subjects`` draws at most one fact per subject."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(world.facts))
    pairs, seen = [], set()
    for i in order:
        f = world.facts[int(i)]
        if distinct_subjects and f.subject in seen:
            continue
        seen.add(f.subject)
        objs, train, _ = world.relations[f.relation]
        new = [o for o in objs if o != f.object][int(rng.integers(len(objs) - 1))]
        pairs.append((f, Request(train[template].replace("{s}", "{}"), f.subject, new, f.object)))
        if len(pairs) == n:
            return pairs
    raise ValueError(f"The world has only {len(pairs)} {'subjects' if distinct_subjects else 'facts'}; "
                     f"asked for {n} requests.")


def ngram_entropy(tokens: Sequence[str]) -> float:
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


def generation_entropy(model, tokenizer, prompts: Sequence[str], max_len: int | None = None) -> float:
    """Mean n-gram entropy (x100) of greedy continuations of ``prompts`` up to ``max_len`` tokens in all
    (default: the model's context length)."""
    max_len = max_len or model.cfg.n_ctx
    vals = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer.encode(p)
            start = len(ids)
            while len(ids) < max_len:
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            vals.append(ngram_entropy([tokenizer.vocab[i] for i in ids[start:]]))
    return 100 * float(np.mean(vals))


def _neighbours(world, fact, req: Request, n: int, seed: int, exclude: set = frozenset()):
    """Other subjects of the same relation, preferring those with the same (true) object as in CounterFact, never
    one whose object is the new target."""
    rng = np.random.default_rng(seed + world.subjects.index(fact.subject))
    same = [f for f in world.facts if f.relation == fact.relation and f.subject != fact.subject
            and f.subject not in exclude]
    first = [f for f in same if f.object == fact.object]
    rest = [f for f in same if f.object not in (fact.object, req.target_new)]
    pick = [first[i] for i in rng.permutation(len(first))[:n]]
    return pick + [rest[i] for i in rng.permutation(len(rest))[:n - len(pick)]]


def _prompt_rows(world, fact, req: Request, n_neighbours: int, seed: int, exclude: set):
    """Prompts to score for one request: (kind, prompt, own object)."""
    rows = [("rewrite", req.text, fact.object)]
    rows += [("paraphrase", p, fact.object) for p in world.prompts(fact, "heldout")]
    rows += [("neighbour", world.prompts(nb)[0], nb.object) for nb in _neighbours(world, fact, req, n_neighbours, seed,
                                                                                  exclude)]
    rows += [("other", world.prompts(o)[0], o.object) for o in world.facts
             if o.subject == fact.subject and o.relation != fact.relation]
    return rows


def request_scores(model, tokenizer, world, pairs, n_neighbours: int = 5, seed: int = 0,
                   fluency: bool = False, exclude: set | None = None) -> pd.DataFrame:
    """Scores of each ``(fact, Request)`` pair on the model as it is now (see the module docstring). Neighbours
    whose subject is in ``exclude`` (e.g. subjects edited in the same batch) are not used."""
    all_rows, owner = [], []
    for j, (f, r) in enumerate(pairs):
        rows = _prompt_rows(world, f, r, n_neighbours, seed, exclude or set())
        all_rows += rows
        owner += [j] * len(rows)
    lp = next_token_logprobs(model, tokenizer, [p for _, p, _ in all_rows])
    kinds = np.array([k for k, _, _ in all_rows])
    owner = np.array(owner)
    own_id = torch.tensor([tokenizer.id(o) for _, _, o in all_rows])
    new_id = torch.tensor([tokenizer.id(pairs[j][1].target_new) for j in owner])
    rows = torch.arange(len(all_rows))
    own, new, top = lp[rows, own_id], lp[rows, new_id], lp.argmax(1)
    out = []
    for j, (f, r) in enumerate(pairs):
        m = owner == j
        sel = {k: torch.from_numpy(m & (kinds == k)) for k in ("rewrite", "paraphrase", "neighbour", "other")}
        rw = sel["rewrite"]
        row = {"subject": f.subject, "relation": f.relation, "true": f.object, "new": r.target_new,
               "es": float((new[rw] > own[rw]).float().mean()),
               "top1": float((top[rw] == new_id[rw]).float().mean()),
               "em": float((new[rw].exp() - own[rw].exp()).mean()),
               "ps": float((new[sel["paraphrase"]] > own[sel["paraphrase"]]).float().mean()),
               "ns": float((own[sel["neighbour"]] > new[sel["neighbour"]]).float().mean()),
               "neighbour_acc": float((top[sel["neighbour"]] == own_id[sel["neighbour"]]).float().mean()),
               "other_acc": float((top[sel["other"]] == own_id[sel["other"]]).float().mean())}
        if fluency:
            row["fluency"] = generation_entropy(model, tokenizer, world.prompts(f, "heldout"))
        out.append(row)
    return pd.DataFrame(out)


def batch_scores(model, tokenizer, world, pairs, n_neighbours: int = 5, seed: int = 0) -> pd.DataFrame:
    """:func:`request_scores` (neighbours drawn from unedited subjects only) plus ``unedited_acc``: the top-1
    accuracy, on their first training prompt, of all facts whose subject none of ``pairs`` edits (the same value on
    every row)."""
    edited = {f.subject for f, _ in pairs}
    df = request_scores(model, tokenizer, world, pairs, n_neighbours, seed, exclude=edited)
    rest = [f for f in world.facts if f.subject not in edited]
    if rest:
        lp = next_token_logprobs(model, tokenizer, [world.prompts(f)[0] for f in rest])
        acc = float((lp.argmax(1) == torch.tensor([tokenizer.id(f.object) for f in rest])).float().mean())
    else:
        acc = float("nan")
    df["unedited_acc"] = acc
    return df


def summarize(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per condition (``{name: request_scores frame}``): means in percent and the score S."""
    rows = []
    cols = ["es", "top1", "ps", "ns", "neighbour_acc", "other_acc", "unedited_acc", "fluency"]
    for name, df in frames.items():
        row = {"condition": name, "n": len(df)}
        for c in cols:
            if c in df:
                row[c] = float(df[c].mean()) * (1 if c == "fluency" else 100)
        es, ps, ns = row["es"], row["ps"], row["ns"]
        row["S"] = 3 / (1 / max(es, 1e-9) + 1 / max(ps, 1e-9) + 1 / max(ns, 1e-9))
        rows.append(row)
    return make_result(pd.DataFrame(rows).round(2))


def single_edits(model, tokenizer, world, pairs, layer: int, C: torch.Tensor | None = None, config=None,
                 n_neighbours: int = 5, fluency: bool = False, progress: bool = True) -> pd.DataFrame:
    """ROME each request on its own at ``layer``, score it, undo it (bit for bit) before the next one. Rows of
    :func:`request_scores` plus the edit's ``rel_error`` (|W'k - v*| / |v*|) and final target NLL."""
    from tqdm.auto import tqdm

    from .rome import rome

    rows = []
    for f, r in tqdm(pairs, desc=f"ROME layer {layer}", disable=not progress, leave=False):
        e = rome(model, tokenizer, r, layer, C, config)
        with e.applied(model):
            row = request_scores(model, tokenizer, world, [(f, r)], n_neighbours, fluency=fluency)
        row["rel_error"] = e.info["rel_error"]
        row["nll_end"] = e.info["nll_end"]
        rows.append(row)
    return make_result(pd.concat(rows, ignore_index=True), method="rome", layer=layer,
                       covariance="identity" if C is None else f"data ({getattr(C, 'count', '?')} tokens)",
                       n_neighbours=n_neighbours)


def many_edits(model, tokenizer, world, pairs, method: str = "memit", layers: Sequence[int] = (0, 1),
               C: dict | None = None, config=None, n_neighbours: int = 5, progress: bool = True) -> pd.DataFrame:
    """Apply all requests together, score them with :func:`batch_scores`, restore the model. ``method="memit"``:
    one MEMIT batch over ``layers``; ``"sequential"``: one ROME edit after another at ``layers[0]``, each computed
    on the model edited so far (the way sequential ROME degrades in the MEMIT paper)."""
    import contextlib

    from tqdm.auto import tqdm

    from .rome import memit, rome

    if method not in ("memit", "sequential"):
        raise ValueError(f"method must be 'memit' or 'sequential'; got {method!r}.")
    reqs = [r for _, r in pairs]
    with contextlib.ExitStack() as stack:
        if method == "memit":
            e = memit(model, tokenizer, reqs, layers, C, config, progress=progress)
            stack.enter_context(e.applied(model))
        else:
            Cl = (C or {}).get(layers[0])
            for r in tqdm(reqs, desc="sequential ROME", disable=not progress, leave=False):
                stack.enter_context(rome(model, tokenizer, r, layers[0], Cl, config).applied(model))
        df = batch_scores(model, tokenizer, world, pairs, n_neighbours)
    return make_result(df, method=method, layers=list(layers) if method == "memit" else [layers[0]],
                       n_edits=len(pairs), covariance="data" if C else "identity")


TESTBED_MEMIT = {"clamp_norm_factor": 4.0, "mom2_update_weight": 1000.0}
"""MEMIT settings for the tiny testbed: the original clamp (0.75 x |h|) stops the targets short of the new object
(mean target NLL 2.6 at layer 0), and lambda is on the scale of this model's key statistics (a sweep over 300-20000
on 100 edits: 1000 keeps 98% of unedited facts at 95% efficacy)."""


def compare_editors(model, tokenizer, world, out=None, n: int = 100, layer: int = 0,
                    memit_layers: Sequence[int] = (0,), memit_config=None, seed: int = 0, n_neighbours: int = 5,
                    fluency: bool = True, progress: bool = True) -> pd.DataFrame:
    """The edit benchmark of the testbed on ``n`` seeded requests (distinct subjects): unedited; ROME at ``layer``
    with C from the training text and with C = I, one edit at a time (undone after each); the same edits all at
    once as one MEMIT batch over ``memit_layers`` and as sequential ROME. Returns the :func:`summarize` table (one
    row per condition). With ``out``, each condition's per-request table is saved there (``<condition>.parquet``)
    and reused when the command is run again, and ``summary.parquet`` and ``summary.png`` are written."""
    from pathlib import Path

    from ..results import load_result, save_result
    from .rome import EditConfig, key_second_moment

    pairs = make_requests(world, n, seed)
    text = world.training_text()
    memit_config = memit_config or EditConfig.memit(**TESTBED_MEMIT)
    cache: dict[int, torch.Tensor] = {}

    def C(l):
        if l not in cache:
            cache[l] = key_second_moment(model, tokenizer, text, l)
        return cache[l]

    jobs = {
        "unedited": lambda: make_result(request_scores(model, tokenizer, world, pairs, n_neighbours,
                                                       fluency=fluency), method="none"),
        f"rome_L{layer}_C_data": lambda: single_edits(model, tokenizer, world, pairs, layer, C(layer),
                                                      n_neighbours=n_neighbours, fluency=fluency,
                                                      progress=progress),
        f"rome_L{layer}_C_identity": lambda: single_edits(model, tokenizer, world, pairs, layer, None,
                                                          n_neighbours=n_neighbours, fluency=fluency,
                                                          progress=progress),
        "unedited_batch": lambda: make_result(batch_scores(model, tokenizer, world, pairs, n_neighbours),
                                              method="none"),
        f"memit_{n}": lambda: many_edits(model, tokenizer, world, pairs, "memit", memit_layers,
                                         {l: C(l) for l in memit_layers}, memit_config, n_neighbours, progress),
        f"sequential_rome_{n}": lambda: many_edits(model, tokenizer, world, pairs, "sequential", [layer],
                                                   {layer: C(layer)}, None, n_neighbours, progress),
    }
    frames = {}
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
                "rome_config": vars(EditConfig()), "key_statistics": f"training text ({len(text)} sentences)"}
    table = make_result(table, **settings)
    if out:
        from ..analyses.plots import plot_edits, save_figure

        save_result(table, Path(out) / "summary.parquet")
        save_figure(plot_edits(table), Path(out) / "summary.png")
    return table
