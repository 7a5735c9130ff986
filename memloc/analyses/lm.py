"""Language-model memorization: fact recall, secret extraction and exposure, memorized (k-extractable) sequences.

Every function takes an :class:`~memloc.models.lm.LM` handle (any tokenizer, multi-token subjects, objects and
secrets) and records the handle's tokenization settings (BOS policy, padding) in its result. Facts and secrets
come as plain records or from a :class:`~memloc.data.facts.FactWorld` (one loader among others).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..results import make_result

__all__ = ["next_token_logprobs", "target_scores", "fact_items", "fact_recall", "canary_extraction", "exposure",
           "token_accuracy", "memorized_sequences", "counterfactual_memorization", "rouge_l", "verbatim_memorization",
           "knowledge_memorization"]


def _lm(lm):
    from ..models.lm import as_lm
    return as_lm(lm)


def next_token_logprobs(lm, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Log-probabilities ``[N, vocab]`` of the token following each prompt."""
    return _lm(lm).next_token_logprobs(prompts, batch_size)


def target_scores(lm, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 128) -> pd.DataFrame:
    """Teacher-forced scores of each (multi-token) target after its prompt: rows ``prompt, target, n_tokens,
    logprob, prob, mean_logprob, first_rank, token_acc, correct`` (``correct``: greedy decoding reproduces the
    whole target)."""
    lm = _lm(lm)
    s = lm.score(prompts, targets, batch_size)
    df = pd.DataFrame({"prompt": list(prompts), "target": list(targets), "n_tokens": s["n_tokens"].astype(int),
                       "logprob": s["logprob"], "prob": np.exp(s["logprob"]), "mean_logprob": s["mean_logprob"],
                       "first_rank": s["first_rank"].astype(int), "token_acc": s["token_acc"], "correct": s["exact"]})
    return make_result(df, **lm.settings)


def fact_items(facts, split: str = "train") -> pd.DataFrame:
    """Rows ``subject, relation, object, prompt`` from a FactWorld (each fact in each ``split`` template), or from
    records (dicts / a DataFrame) with ``prompt`` and ``object`` (or ``target``) and optionally ``subject``,
    ``relation``."""
    from ..data.facts import FactWorld

    if isinstance(facts, FactWorld):
        return pd.DataFrame([{"subject": f.subject, "relation": f.relation, "object": f.object, "prompt": p}
                             for f in facts.facts for p in facts.prompts(f, split)],
                            columns=["subject", "relation", "object", "prompt"])
    df = pd.DataFrame(list(facts) if not isinstance(facts, pd.DataFrame) else facts).copy()
    if "object" not in df and "target" in df:
        df = df.rename(columns={"target": "object"})
    for col in ("prompt", "object"):
        if col not in df:
            raise ValueError(f"Fact records need a {col!r} field (and 'prompt'); got columns {list(df.columns)}.")
    for col in ("subject", "relation"):
        if col not in df:
            df[col] = None
    return df[["subject", "relation", "object", "prompt"]]


def fact_recall(lm, facts, split: str = "train", batch_size: int = 128) -> pd.DataFrame:
    """Per (fact, prompt): ``subject, relation, object, prompt, prob`` (of the whole object), ``rank`` (of its
    first token), ``correct`` (greedy decoding reproduces the whole object; for one-token objects: top-1)."""
    lm = _lm(lm)
    df = fact_items(facts, split)
    if df.empty:
        raise ValueError("No facts to score.")
    s = lm.score(df.prompt.tolist(), df.object.tolist(), batch_size)
    df["prob"] = np.exp(s["logprob"])
    df["rank"] = s["first_rank"].astype(int)
    df["n_tokens"] = s["n_tokens"].astype(int)
    df["correct"] = s["exact"]
    return make_result(df, split=split, **lm.settings)


def _secrets(secrets):
    from ..data.facts import FactWorld

    out = list(secrets.canaries if isinstance(secrets, FactWorld) else secrets)
    for c in out:
        if not all(hasattr(c, a) for a in ("name", "prefix", "secret_text", "space")):
            raise TypeError(f"A secret needs name, prefix, secret_text and space (memloc.data.records.Secret); got "
                            f"{type(c).__name__}.")
    return out


def _beam(lm, prompt_ids: list[int], n: int, beams: int) -> list[int]:
    """Beam search over ``n`` tokens (``beams`` hypotheses); the most likely complete continuation."""
    hyps = [(0.0, [])]
    with torch.no_grad():
        for _ in range(n):
            toks, lens = lm.pad([prompt_ids + h for _, h in hyps])
            lp = torch.log_softmax(lm.logits(toks).double(), -1)[torch.arange(len(hyps)), (lens - 1)].cpu()
            cand = []
            for (score, h), row in zip(hyps, lp):
                top = row.topk(beams)
                cand += [(score + float(v), h + [int(i)]) for v, i in zip(top.values, top.indices)]
            hyps = sorted(cand, key=lambda x: -x[0])[:beams]
    return hyps[0][1]


def canary_extraction(lm, secrets, method: str = "greedy", beams: int = 4) -> pd.DataFrame:
    """Decode after each secret's prefix as many tokens as the secret has; ``extracted`` is True when the decoded
    tokens are exactly the secret's (extraction with the prefix as the prompt). ``method``: ``"greedy"`` (all
    secrets in one batched decoding) or ``"beam"`` (``beams`` hypotheses). ``secrets``: a FactWorld (its
    canaries) or :class:`~memloc.data.records.Secret` records."""
    lm = _lm(lm)
    if method not in ("greedy", "beam"):
        raise ValueError(f"The 'method' parameter must be 'greedy' or 'beam'. Got {method!r} instead.")
    secs = _secrets(secrets)
    cols = ["name", "repeats", "secret", "generated", "extracted"]
    if not secs:
        return make_result(pd.DataFrame(columns=cols), method=method, **lm.settings)
    prompts = [lm.encode(c.prefix) for c in secs]
    targets = [lm.target_ids(c.secret_text, c.prefix) for c in secs]
    if method == "greedy":
        by_len: dict[int, list[int]] = {}
        for i, t in enumerate(targets):
            by_len.setdefault(len(t), []).append(i)
        got: list[list[int]] = [[] for _ in secs]
        for n, idx in by_len.items():
            for i, g in zip(idx, lm.generate([prompts[i] for i in idx], n)):
                got[i] = g
    else:
        got = [_beam(lm, p, len(t), beams) for p, t in zip(prompts, targets)]
    rows = [{"name": c.name, "repeats": getattr(c, "repeats", None), "secret": c.secret_text,
             "generated": lm.decode(g).strip(), "extracted": g == t} for c, g, t in zip(secs, got, targets)]
    return make_result(pd.DataFrame(rows, columns=cols), method=method, beams=beams if method == "beam" else None,
                       **lm.settings)


def _per_position_tokens(lm, prefix: str, space, candidates: list[str]) -> list[dict[int, int]] | None:
    """``[{symbol: token}] * length`` if every candidate tokenizes (as a continuation of ``prefix``) into exactly
    one token per symbol, the token depending only on the symbol and its position; else None."""
    maps: list[dict[int, int]] = [dict() for _ in range(space.length)]
    for i, cand in enumerate(candidates):
        ids = lm.target_ids(cand, prefix)
        if len(ids) != space.length:
            return None
        sym = np.unravel_index(i, (len(space.alphabet),) * space.length)
        for j, (s, t) in enumerate(zip(sym, ids)):
            if maps[j].setdefault(int(s), t) != t:
                return None
    return maps


def _stem_logprobs(lm, prefix: str, space, maps, batch_size: int = 1024) -> np.ndarray:
    """Log-probability of every candidate (lexicographic order) from one pass over the ``|A|^(k-1)`` stems: a
    candidate's score is its stem's token log-probabilities plus the last symbol's at the stem's end."""
    import itertools

    k, a = space.length, len(space.alphabet)
    base = lm.encode(prefix)
    stems = list(itertools.product(range(a), repeat=k - 1))
    ids = torch.tensor([base + [maps[j][s] for j, s in enumerate(st)] for st in stems], dtype=torch.long).view(len(stems), -1)
    last_tok = torch.tensor([maps[k - 1][s] for s in range(a)])
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            x = ids[s:s + batch_size]
            lp = torch.log_softmax(lm.logits(x).double(), -1).cpu()
            pos = torch.arange(len(base) - 1, len(base) - 1 + k - 1)
            stem = lp[:, pos].gather(2, x[:, pos + 1].unsqueeze(-1)).squeeze(-1).sum(1) if k > 1 else \
                torch.zeros(len(x), dtype=torch.float64)
            last = lp[:, len(base) - 1 + k - 1][:, last_tok]
            out.append((stem[:, None] + last).reshape(-1))
    return torch.cat(out).numpy()


def exposure(lm, secrets, max_candidates: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Exposure of each secret (Carlini et al. 2019): ``log2 |R| - log2 rank``, the rank of the true secret among
    all candidates of its :class:`~memloc.data.records.CandidateSpace` by the model's log-likelihood of the
    secret's *tokens* after the prefix (any tokenization: ``"4821"`` may be one BPE token or four).

    ``method="exact"`` when the space has at most ``max_candidates`` strings: every candidate is scored (in one
    pass over the stems when each symbol is its own token, as with memloc's word tokenizer; otherwise every
    candidate's tokens are scored); ``method="sampled"`` beyond: Carlini et al.'s estimate from ``max_candidates``
    uniform samples (rank ~ 1 + |R| x the fraction of samples more likely than the secret). Rows ``name, repeats,
    rank, exposure, max_exposure, log_perplexity, method, exact``.
    """
    lm = _lm(lm)
    rng = np.random.default_rng(seed)
    rows = []
    for c in _secrets(secrets):
        space = c.space
        if space.size <= max_candidates:
            cands = list(space.all())
            true_at = space.index(c.secret_text)
            maps = _per_position_tokens(lm, c.prefix, space, cands)
            if maps is not None:
                lp = _stem_logprobs(lm, c.prefix, space, maps)
                how = "exact (stems)"
            else:
                lp = lm.score([c.prefix] * len(cands), cands, batch_size=512)["logprob"]
                how = "exact (every candidate)"
            method = "exact"
        else:
            cands = space.sample(max_candidates, rng) + [c.secret_text]
            true_at = len(cands) - 1
            lp = lm.score([c.prefix] * len(cands), cands, batch_size=512)["logprob"]
            method, how = "sampled", f"sampled ({max_candidates} uniform candidates)"
        # every candidate, the secret included, is scored in the same batched passes (a separate pass differs in
        # the last float bits and could rank the secret below itself); ties within 1e-6 nats count as equal
        true = lp[true_at]
        better = float((np.delete(lp, true_at) > true + 1e-6).sum())
        rank = 1 + (better if method == "exact" else better / (len(cands) - 1) * space.size)
        rows.append({"name": c.name, "repeats": getattr(c, "repeats", None), "rank": rank,
                     "exposure": math.log2(space.size) - math.log2(rank), "max_exposure": math.log2(space.size),
                     "log_perplexity": -true, "method": method, "scoring": how, "exact": method == "exact"})
    return make_result(pd.DataFrame(rows), max_candidates=max_candidates, seed=seed, **lm.settings)


def rouge_l(predictions: Sequence[str], references: Sequence[str], kind: str = "f1") -> np.ndarray:
    """ROUGE-L of each prediction against its reference with Google's ``rouge_score`` (Porter stemmer on, as
    OpenUnlearning and MUSE score; lower-cased words, punctuation dropped): ``kind`` ``"f1"`` (MUSE's VerbMem and
    KnowMem in OpenUnlearning, ``rougeL_f1``) or ``"recall"`` (TOFU's ``rougeL_recall``). An empty reference and
    an empty prediction score 0."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # pragma: no cover - installed with memloc[lm]
        raise ImportError("ROUGE needs the rouge-score package: pip install 'memloc[lm]' (or rouge-score).") from e
    if kind not in ("f1", "recall", "precision"):
        raise ValueError(f"kind must be 'f1', 'recall' or 'precision'; got {kind!r}.")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    attr = {"f1": "fmeasure", "recall": "recall", "precision": "precision"}[kind]
    return np.asarray([getattr(scorer.score(r, p)["rougeL"], attr) for p, r in zip(predictions, references)], float)


def _cut_at_eos(lm, ids: list[int]) -> list[int]:
    return ids[:ids.index(lm.eos_id)] if lm.eos_id is not None and lm.eos_id in ids else ids


def verbatim_memorization(lm, texts: Sequence[str], prefix_fraction: float = 0.5, kind: str = "f1",
                          batch_size: int = 64) -> pd.DataFrame:
    """MUSE's verbatim memorization (VerbMem): prompt with the first ``prefix_fraction`` of each text's tokens (at
    least one, at most all but one), decode greedily as many tokens as the rest has, and score the decoded
    continuation (up to an end-of-text token) against the true one with :func:`rouge_l` (``kind``). Per text:
    ``text, prompt, truth, generated, n_prompt, n_truth, rouge``; the mean is the VerbMem score (0-1; MUSE
    prompts with 32 tokens of a news article and generates 128, a ratio the sentences of a testbed cannot have,
    hence the fraction)."""
    from ..validate import number

    lm = _lm(lm)
    number("prefix_fraction", prefix_fraction, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    texts = list(texts)
    if not texts:
        raise ValueError("No texts to score.")
    b = 1 if lm.prepend_bos else 0
    prompts, truths = [], []
    for t in texts:
        ids = lm.encode(t)
        k = len(ids) - b
        if k < 2:
            raise ValueError(f"{t!r} has {k} token(s); verbatim memorization needs at least 2 (a prompt and a rest).")
        cut = b + min(k - 1, max(1, int(round(prefix_fraction * k))))
        prompts.append(ids[:cut])
        truths.append(ids[cut:])
    gen: list[list[int]] = [None] * len(texts)  # type: ignore[list-item]
    by_len: dict[int, list[int]] = {}
    for i, tr in enumerate(truths):
        by_len.setdefault(len(tr), []).append(i)
    for n, idx in by_len.items():
        for i, g in zip(idx, lm.generate([prompts[i] for i in idx], n, batch_size)):
            gen[i] = _cut_at_eos(lm, g)
    truth_s = [lm.decode(tr) for tr in truths]
    gen_s = [lm.decode(g) for g in gen]
    df = pd.DataFrame({"text": texts, "prompt": [lm.decode(p[b:]) for p in prompts], "truth": truth_s,
                       "generated": gen_s, "n_prompt": [len(p) - b for p in prompts],
                       "n_truth": [len(tr) for tr in truths], "rouge": rouge_l(gen_s, truth_s, kind)})
    return make_result(df, metric=f"VerbMem: ROUGE-L {kind} of the greedy continuation", prefix_fraction=prefix_fraction,
                       **lm.settings)


def knowledge_memorization(lm, facts, split: str = "heldout", kind: str = "f1", extra_tokens: int = 0,
                           stop: Sequence[str] = (".", "\n"), batch_size: int = 64) -> pd.DataFrame:
    """MUSE's knowledge memorization (KnowMem) on facts asked in other words than the training text: each prompt
    of ``split`` (default the world's held-out templates; or records with ``prompt`` and ``object``, as for
    :func:`fact_recall`) is decoded greedily for the object's token count + ``extra_tokens`` tokens (default 0:
    an answer as long as the object, whatever the text format; stopping at end-of-text), the answer is cut at the
    first ``stop`` string (MUSE / OpenUnlearning generate up to 32 tokens and stop at blank lines and "Question:";
    a GPT-2 testbed sentence ends with a full stop, a word testbed's sentence has none), and scored against the
    object with :func:`rouge_l`.
    Per prompt: ``subject, relation, object, prompt, answer, rouge``; the mean is KnowMem (0-1). MUSE asks
    questions with few-shot examples; the testbed's held-out templates are its paraphrased questions."""
    lm = _lm(lm)
    df = fact_items(facts, split)
    if df.empty:
        raise ValueError("No facts to score.")
    if not isinstance(extra_tokens, int) or extra_tokens < 0:
        raise ValueError(f"extra_tokens must be an int >= 0; got {extra_tokens!r}.")
    n_obj = [len(lm.target_ids(o, p)) for p, o in zip(df.prompt, df.object)]
    answers: list[str] = [""] * len(df)
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(n_obj):
        by_len.setdefault(n + extra_tokens, []).append(i)
    for n, idx in by_len.items():
        for i, g in zip(idx, lm.generate([df.prompt.iloc[i] for i in idx], n, batch_size)):
            a = lm.decode(_cut_at_eos(lm, g))
            for s in stop:
                a = a.split(s)[0]
            answers[i] = a.strip()
    df["answer"] = answers
    df["rouge"] = rouge_l(answers, df.object.astype(str).tolist(), kind)
    return make_result(df, split=split, metric=f"KnowMem: ROUGE-L {kind} of the greedy answer",
                       extra_tokens=extra_tokens, stop=list(stop), **lm.settings)


def token_accuracy(lm, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Per text: the fraction of its tokens after the first that the model predicts top-1 (teacher forcing;
    padding masked by length)."""
    lm = _lm(lm)
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            toks, lens = lm.batch(texts[s:s + batch_size])
            pred = lm.logits(toks)[:, :-1].argmax(-1).cpu()
            mask = lm.mask(lens - 1, toks.shape[1] - 1)
            out.append(((pred == toks[:, 1:]) & mask).sum(1).double() / mask.sum(1).clamp_min(1))
    return torch.cat(out).numpy()


def memorized_sequences(lm, texts, prefix_tokens: int = 32, suffix_tokens: int = 32, batch_size: int = 64,
                        method: str = "batched", progress: bool = False) -> pd.DataFrame:
    """k-extractable sequences (Carlini et al. 2023): for each text, its first ``prefix_tokens`` tokens are the
    prompt (after BOS, by the handle's policy) and the next ``suffix_tokens`` the true continuation; the text is
    ``extractable`` when greedy decoding from the prefix reproduces the continuation exactly.

    Rows ``text_id, text, prefix, suffix, generated, extractable, match_fraction`` (position-wise agreement of
    the greedy continuation with the true one), ``loss`` (mean NLL per continuation token, teacher-forced),
    ``n_tokens``; texts shorter than ``prefix_tokens + suffix_tokens`` tokens get ``eligible=False`` and NaNs.
    ``texts``: a list, or a file / saved dataset (:func:`memloc.data.records.load_texts`). ``method="batched"``:
    one teacher-forced pass per batch decides exact matches (greedy decoding agrees with teacher forcing up to
    the first miss) and only the misses are decoded further, in batches; ``"loop"``: one text at a time,
    decoding every continuation (the straightforward reference).
    """
    from tqdm.auto import tqdm

    from ..data.records import load_texts

    lm = _lm(lm)
    for name, v in (("prefix_tokens", prefix_tokens), ("suffix_tokens", suffix_tokens), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"The {name!r} parameter must be an int in [1, inf). Got {v!r} instead.")
    if method not in ("batched", "loop"):
        raise ValueError(f"The 'method' parameter must be 'batched' or 'loop'. Got {method!r} instead.")
    texts = load_texts(texts)
    k, n = prefix_tokens, suffix_tokens
    bos = [lm.bos_id] if lm.prepend_bos else []
    enc = [lm.encode(t, bos=False) for t in texts]
    ok = [len(e) >= k + n for e in enc]
    idx = [i for i, o in enumerate(ok) if o]
    res = {i: None for i in idx}
    if method == "loop":
        for i in tqdm(idx, desc="memorized (loop)", disable=not progress, leave=False):
            p, sfx = bos + enc[i][:k], enc[i][k:k + n]
            g = lm.generate([p], n, batch_size=1)[0]
            with torch.no_grad():
                lp = torch.log_softmax(lm.logits(torch.tensor([p + sfx])).double(), -1)[0].cpu()
            pos = torch.arange(len(p) - 1, len(p) - 1 + n)
            loss = float(-lp[pos].gather(1, torch.tensor(sfx)[:, None]).mean())
            res[i] = (g, loss)
    else:
        for b in tqdm(range(0, len(idx), batch_size), desc="memorized", disable=not progress, leave=False):
            chunk = idx[b:b + batch_size]
            seqs = torch.tensor([bos + enc[i][:k + n] for i in chunk], dtype=torch.long)
            with torch.no_grad():
                lp = torch.log_softmax(lm.logits(seqs).double(), -1).cpu()
            start = len(bos) + k
            pos = torch.arange(start - 1, start - 1 + n)
            tgt = seqs[:, start:start + n]
            tf = lp[:, pos]
            nll = -tf.gather(2, tgt.unsqueeze(-1)).squeeze(-1).mean(1)
            right = tf.argmax(-1) == tgt
            miss = [(j, int((~right[j]).nonzero()[0])) for j in range(len(chunk)) if not right[j].all()]
            gen = {j: tgt[j].tolist() for j in range(len(chunk))}
            if miss:  # greedy decoding equals the true tokens up to the first miss; decode the rest
                first = [seqs[j, :start + m].tolist() + [int(tf[j, m].argmax())] for j, m in miss]
                by_len: dict[int, list[int]] = {}
                for q, (j, m) in enumerate(miss):
                    by_len.setdefault(n - m - 1, []).append(q)
                for rest, qs in by_len.items():
                    outs = lm.generate([first[q] for q in qs], rest, batch_size=batch_size) if rest else [[] for _ in qs]
                    for q, o in zip(qs, outs):
                        j, m = miss[q]
                        gen[j] = tgt[j, :m].tolist() + [first[q][-1]] + o
            for j, i in enumerate(chunk):
                res[i] = (gen[j], float(nll[j]))
    rows = []
    for i, t in enumerate(texts):
        if not ok[i]:
            rows.append({"text_id": i, "text": t, "eligible": False, "prefix": None, "suffix": None,
                         "generated": None, "extractable": np.nan, "match_fraction": np.nan, "loss": np.nan,
                         "n_tokens": len(enc[i])})
            continue
        g, loss = res[i]
        sfx = enc[i][k:k + n]
        rows.append({"text_id": i, "text": t, "eligible": True, "prefix": lm.decode(enc[i][:k]),
                     "suffix": lm.decode(sfx), "generated": lm.decode(g), "extractable": g == sfx,
                     "match_fraction": float(np.mean([a == b for a, b in zip(g, sfx)])), "loss": loss,
                     "n_tokens": len(enc[i])})
    df = pd.DataFrame(rows)
    return make_result(df, prefix_tokens=k, suffix_tokens=n, method=method, definition=(
        "k-extractable (Carlini et al. 2023): greedy decoding from the first k tokens reproduces the next n"),
        n_texts=len(texts), n_eligible=len(idx), **lm.settings)


def counterfactual_memorization(world, n_models: int = 8, ratio: float = 0.5, epochs: int = 40,
                                n_layers: int = 2, d_model: int = 64, d_mlp: int = 256, lr: float = 3e-3,
                                batch_size: int = 64, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Counterfactual memorization of each distinct training sentence (Zhang et al. 2021): train ``n_models``
    small transformers, each on a random ``ratio`` of the distinct sentences (every copy of a repeated sentence
    goes in or out together; LiRA-style balanced subsets from :func:`memloc.ensemble.subset_masks`), and score
    ``mem = mean token accuracy of models that saw it - that of models that did not``.

    Rows ``text, kind`` (``canary`` / ``fact`` / ``profile``), ``copies``, ``acc_in``, ``acc_out``, ``mem``.
    A canary is unpredictable without seeing it (high ``mem``); a fact sentence is largely predictable from the
    fact's other sentences (low ``mem``).
    """
    from tqdm.auto import tqdm

    from ..data.facts import WordTokenizer
    from ..ensemble import subset_masks
    from ..models.lm import LM
    from ..models.transformer import _train_epoch, build_tiny_transformer, tiny_transformer_config

    if n_models < 2:
        raise ValueError(f"n_models must be at least 2 (models that saw a sentence and models that did not); "
                         f"got {n_models}.")
    text = world.training_text()
    distinct = list(dict.fromkeys(text))
    copies = {t: text.count(t) for t in distinct}
    tok = WordTokenizer(world.words())
    masks = subset_masks(n_models, len(distinct), ratio, seed, balanced=True)
    cfg = tiny_transformer_config(len(tok), n_layers, d_model, max(1, d_model // 32), d_mlp,
                                  max(16, max(len(t.split()) + 1 for t in distinct)))
    acc = np.zeros((n_models, len(distinct)))
    for m in tqdm(range(n_models), desc="counterfactual models", disable=not progress, leave=False):
        train = [t for t, keep in zip(distinct, masks[m]) if keep for _ in range(copies[t])]
        tokens, lengths = tok.batch(train)
        model = build_tiny_transformer(cfg, seed=seed * 1000 + m)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        for epoch in range(1, epochs + 1):
            _train_epoch(model, opt, tokens, lengths, batch_size, seed * 1000 + m, epoch)
        acc[m] = token_accuracy(LM(model.eval(), tok), distinct)
    with np.errstate(invalid="ignore"):
        acc_in = np.where(masks, acc, np.nan)
        acc_out = np.where(~masks, acc, np.nan)
        a_in, a_out = np.nanmean(acc_in, 0), np.nanmean(acc_out, 0)
    canaries = {c.text for c in world.canaries}
    objects = {f.object for f in world.facts}
    kind = ["canary" if t in canaries else "profile" if set(t.split()[1:]) <= objects else "fact" for t in distinct]
    df = pd.DataFrame({"text": distinct, "kind": kind, "copies": [copies[t] for t in distinct],
                       "acc_in": a_in, "acc_out": a_out, "mem": a_in - a_out})
    return make_result(df, n_models=n_models, ratio=ratio, epochs=epochs, n_layers=n_layers, d_model=d_model,
                       d_mlp=d_mlp, lr=lr, batch_size=batch_size, seed=seed, subsets="balanced (LiRA)",
                       metric="teacher-forced top-1 token accuracy")
