"""Causal tracing (Meng et al. 2022) on TransformerLens models (``TransformerBridge`` or ``HookedRootModule``).

For a prompt whose next token is the fact's object: run it clean; run it with Gaussian noise added to the subject
tokens' embeddings (``noise`` = 3 x the standard deviation of subject-token embeddings by default, ``samples``
noise draws, fixed by ``seed`` so every restoration sees the same corruption); then, for every (layer, position),
copy the clean state of the residual stream (``kind="resid"``), the MLP output (``"mlp"``) or the attention output
(``"attn"``) into the corrupted runs, over a window of ``window`` layers centred on the layer. The indirect effect
``IE = p_restored - p_corrupted`` of the object's probability at the last position says how much that state
carries the fact; the total effect is ``TE = p_clean - p_corrupted``.

All (layer, position) cells are evaluated in one batched forward pass: each cell has its own block of ``samples``
corrupted rows, and per-layer hooks restore exactly those rows' states.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from ..hooks import hooks, require_eval
from ..results import make_result

__all__ = ["SITES", "subject_noise_std", "subject_embedding_std", "rome_noise", "trace", "trace_facts", "fact_requests", "bucket_positions"]

SITES = {"resid": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out", "attn": "blocks.{}.hook_attn_out"}
EMBED = "hook_embed"


def subject_noise_std(model, token_ids: Sequence[int]) -> float:
    """Standard deviation of the given tokens' embedding vectors, pooled over tokens and dimensions."""
    W = model.W_E if hasattr(model, "W_E") else model.embed.W_E
    return float(W[torch.as_tensor(list(token_ids), device=W.device)].detach().std())


def subject_embedding_std(lm, subjects: Sequence[str]) -> float:
    """kmeng01/rome's ``collect_embedding_std``: each subject tokenized on its own (no BOS), the token embeddings of
    all their tokens (repeats included) pooled, and the standard deviation over tokens and dimensions."""
    from ..models.lm import as_lm

    lm = as_lm(lm)
    ids = [i for s in subjects for i in lm.encode(s, bos=False)]
    if not ids:
        raise ValueError("subject_embedding_std needs at least one subject with tokens.")
    return subject_noise_std(lm.model, ids)


def rome_noise(scale: float, n_subject: int, d_model: int, samples: int = 10, seed: int = 1) -> torch.Tensor:
    """kmeng01/rome's corruption, ``[samples, n_subject, d_model]`` (float64): ``scale`` x
    ``numpy.random.RandomState(seed).randn(samples, n_subject, d_model)`` (its ``trace_with_patch`` draws this
    anew, seed 1, for every call, so every restoration sees the same noise). Pass it as ``trace(..., noise=)``."""
    import numpy as np

    return torch.from_numpy(np.random.RandomState(seed).randn(samples, n_subject, d_model)) * float(scale)


def _window(layer: int, n_layers: int, window: int) -> range:
    """The layers restored for row ``layer``: kmeng01/rome's ``range(max(0, l - w // 2), min(L, l - (-w // 2)))``
    (truncated at the bottom and top, never shifted)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def trace(model, tokens: Sequence[int], subject_positions: Sequence[int], target: int | None = None,
          kind: str = "resid", noise: float | torch.Tensor | None = None, samples: int | None = None,
          window: int = 1, seed: int = 0, noise_tokens: Sequence[int] | None = None) -> pd.DataFrame:
    """Trace one prompt. ``tokens``: the prompt's ids (``[T]``); ``subject_positions``: indices of the subject's
    tokens; ``target``: the token whose probability is traced (default: the clean top-1).

    ``noise``: the noise scale (default 3 x the std of the embeddings of ``noise_tokens``, else of the prompt's
    subject tokens), drawn as ``samples`` (default 10) standard normal ``[n_subject, d_model]`` draws from a torch
    generator seeded by ``seed``; or the noise itself, a tensor ``[samples, n_subject, d_model]`` added to the
    subject tokens' embeddings (:func:`rome_noise` gives kmeng01/rome's exact draws). Row ``l`` of a window
    restores layers ``max(0, l - window // 2) .. min(L, l - (-window // 2)) - 1``, as kmeng01/rome does.

    Returns a result with rows ``layer, position, ie`` and settings ``p_clean, p_corrupted, te, target, noise,
    samples, window, kind``.
    """
    from ..hooks import model_device

    require_eval(model, "Causal tracing")
    dev = model_device(model)
    if kind not in SITES:
        raise ValueError(f"The 'kind' parameter must be one of {sorted(SITES)}. Got {kind!r} instead.")
    given = isinstance(noise, torch.Tensor)
    if given:
        if noise.ndim != 3 or (samples is not None and noise.shape[0] != samples):
            raise ValueError("The 'noise' tensor must be [samples, n_subject, d_model]"
                             + (f" with samples = {samples}" if samples is not None else "")
                             + f". Got shape {list(noise.shape)} instead.")
        samples = noise.shape[0]
    samples = 10 if samples is None else samples
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"The 'samples' parameter must be an int in [1, inf). Got {samples!r} instead.")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"The 'window' parameter must be an int in [1, inf). Got {window!r} instead.")
    tokens = torch.as_tensor(list(tokens), dtype=torch.long)
    T = len(tokens)
    subj = torch.as_tensor(list(subject_positions), dtype=torch.long)
    if len(subj) == 0 or subj.min() < 0 or subj.max() >= T:
        raise ValueError(f"subject_positions must index the {T} prompt tokens; got {subj.tolist()}.")
    L = model.cfg.n_layers
    if given and tuple(noise.shape[1:]) != (len(subj), model.cfg.d_model):
        raise ValueError(f"The 'noise' tensor must be [samples, {len(subj)} subject tokens, d_model "
                         f"{model.cfg.d_model}]. Got shape {list(noise.shape)} instead.")
    if noise is None:
        noise = 3.0 * subject_noise_std(model, noise_tokens if noise_tokens is not None else tokens[subj].tolist())
    sites = [SITES[kind].format(l) for l in range(L)]

    # clean run: probabilities and the clean states at every site
    clean: dict[str, torch.Tensor] = {}
    with torch.no_grad(), hooks(model, {s: (lambda out, s=s: clean.__setitem__(s, out[0].detach().clone()))
                                        for s in sites}):
        p0 = torch.softmax(model(tokens[None].to(dev))[0, -1].double(), -1).cpu()
    target = int(p0.argmax()) if target is None else int(target)
    d = clean[sites[0]].shape[-1]
    if given:
        eps = noise.detach().to(dev)
    else:
        g = torch.Generator().manual_seed(seed)
        eps = (torch.randn(samples, len(subj), model.cfg.d_model, generator=g) * noise).to(dev)

    cells = [(l, t) for l in range(L) for t in range(T)]
    n_rows = (len(cells) + 1) * samples  # block 0: corrupted only; block c+1: cell c restored
    batch = tokens[None].expand(n_rows, T).to(dev)

    def corrupt(out):
        out = out.clone()
        out[:, subj] += eps.repeat(n_rows // samples, 1, 1).to(out.dtype)
        return out

    restore = {}
    for l in range(L):
        rows, pos = [], []
        for c, (cl, t) in enumerate(cells):
            if l in _window(cl, L, window):
                r = torch.arange((c + 1) * samples, (c + 2) * samples)
                rows.append(r)
                pos.append(torch.full_like(r, t))
        if rows:
            restore[sites[l]] = (torch.cat(rows).to(dev), torch.cat(pos).to(dev))

    def make_restore(site):
        rows, pos = restore[site]

        def fn(out):
            out = out.clone()
            out[rows, pos] = clean[site][pos].to(out.dtype)
            return out
        return fn

    fns = {EMBED: corrupt, **{s: make_restore(s) for s in restore}}
    with torch.no_grad(), hooks(model, fns):
        p = torch.softmax(model(batch)[:, -1].double(), -1)[:, target].view(len(cells) + 1, samples).mean(1).cpu()
    p_corrupt = float(p[0])
    ie = (p[1:] - p[0]).numpy()
    df = pd.DataFrame({"layer": [l for l, _ in cells], "position": [t for _, t in cells], "ie": ie})
    return make_result(df, kind=kind, p_clean=float(p0[target]), p_corrupted=p_corrupt,
                       te=float(p0[target]) - p_corrupt, target=target,
                       noise="given tensor" if given else float(noise),
                       noise_std=float(eps.double().std()) if given else float(noise), samples=samples,
                       window=window, window_rule="kmeng01/rome: max(0, l - w // 2) .. min(L, l - (-w // 2)) - 1",
                       seed=None if given else seed, subject_positions=subj.tolist(), n_layers=L, d=d)


def bucket_positions(T: int, subject_positions: Sequence[int]) -> list[str]:
    """Meng et al.'s token buckets for a prompt of ``T`` tokens."""
    subj = sorted(subject_positions)
    out = []
    for t in range(T):
        if t in subj:
            out.append("last subject" if t == subj[-1] else ("first subject" if t == subj[0] else "middle subject"))
        elif t == T - 1:
            out.append("last")
        elif t == subj[-1] + 1:
            out.append("first subsequent")
        elif t > subj[-1]:
            out.append("further")
        else:
            out.append("before subject")
    return out


def fact_requests(facts, split: str = "train") -> list[dict]:
    """``[{prompt (with {}), subject, target, relation}]``: a FactWorld's facts on their first ``split`` template,
    or records (dicts, EditRecords) with ``prompt``, ``subject`` and ``target`` / ``target_true`` / ``object``."""
    from ..data.facts import FactWorld

    if isinstance(facts, FactWorld):
        return [{"prompt": facts.relations[f.relation][1 if split == "train" else 2][0].replace("{s}", "{}"),
                 "subject": f.subject, "target": f.object, "relation": f.relation} for f in facts.facts]
    out = []
    for i, r in enumerate(facts):
        get = (lambda k, r=r: getattr(r, k, None)) if not isinstance(r, dict) else r.get
        target = get("target") or get("target_true") or get("object")
        if get("prompt") is None or get("subject") is None or target is None:
            raise ValueError(f"Fact record {i} needs 'prompt' (with {{}}), 'subject' and 'target' (or target_true / "
                             "object).")
        if isinstance(target, dict):
            target = target.get("str")
        if get("prompt").count("{}") != 1:
            raise ValueError(f"Fact record {i}: the prompt must contain '{{}}' once, where the subject goes; got "
                             f"{get('prompt')!r}.")
        out.append({"prompt": get("prompt"), "subject": get("subject"), "target": target,
                    "relation": get("relation")})
    return out


def trace_facts(lm, facts, kind: str = "resid", samples: int = 10, window: int = 1, seed: int = 0,
                only_known: bool = True, limit: int | None = None, progress: bool = True,
                noise: float | None = None, noise_subjects: Sequence[str] | None = None) -> pd.DataFrame:
    """Trace each fact (a FactWorld's facts on their first training template, or records, see
    :func:`fact_requests`; the first ``limit`` of them); rows ``subject, relation, layer, position, bucket, ie,
    te``.

    The subject's tokens are found from character offsets (multi-token subjects work); the traced token is the
    target's first token. The noise scale is ``noise`` if given; else, with ``noise_subjects``, 3 x
    :func:`subject_embedding_std` of those subjects (kmeng01/rome's ``s3``: each subject tokenized alone, repeats
    counted); else 3 x the std of the embeddings of the distinct tokens of all facts' subjects as they appear in
    their prompts. Facts whose first target token the model does not predict top-1 are skipped when
    ``only_known`` (as in the reference).
    """
    from tqdm.auto import tqdm

    from ..models.lm import as_lm

    lm = as_lm(lm)
    model = lm.model
    reqs = fact_requests(facts)
    if not reqs:
        raise ValueError("No facts to trace.")
    prepared = []
    for r in reqs:
        text = r["prompt"].format(r["subject"])
        ids = lm.encode(text)
        pos = lm.span(text, r["subject"], start=r["prompt"].index("{}"))
        prepared.append((r, ids, pos, lm.target_ids(r["target"], text)[0]))
    if noise is not None:
        rule = "given"
    elif noise_subjects is not None:
        noise, rule = 3.0 * subject_embedding_std(lm, noise_subjects), "3 x std of the given subjects' embeddings"
    else:
        subj_ids = sorted({ids[p] for _, ids, pos, _ in prepared for p in pos})
        noise = 3.0 * subject_noise_std(model, subj_ids)  # over the subjects of every fact given
        rule = "3 x std of subject-token embeddings"
    frames = []
    for r, ids, pos, target in tqdm(prepared[:limit], desc=f"trace ({kind})", disable=not progress, leave=False):
        if only_known:
            with torch.no_grad():
                if int(lm.logits(torch.tensor([ids]))[0, -1].argmax()) != target:
                    continue
        df = trace(model, ids, pos, target, kind, noise, samples, window, seed)
        st = df.attrs["settings"]
        df["bucket"] = [bucket_positions(len(ids), pos)[t] for t in df.position]
        df["te"] = st["te"]
        df.insert(0, "relation", r["relation"])
        df.insert(0, "subject", r["subject"])
        frames.append(df)
    if not frames:
        raise ValueError("No fact was traced (the model predicts none of their first target tokens top-1; pass "
                         "only_known=False to trace them anyway).")
    out = pd.concat(frames, ignore_index=True)
    return make_result(out, kind=kind, samples=samples, window=window, seed=seed, noise=noise,
                       noise_rule=rule, n_facts=len(frames),
                       target="first token of the target", **lm.settings)
