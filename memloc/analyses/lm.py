"""Language-model memorization metrics on a fact world: fact recall, canary extraction and exposure."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import torch

from ..hooks import require_eval
from ..results import make_result

__all__ = ["next_token_logprobs", "fact_recall", "canary_extraction", "exposure", "token_accuracy",
           "counterfactual_memorization"]


def next_token_logprobs(model, tokenizer, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Log-probabilities ``[N, vocab]`` of the token following each prompt (right-padded batches; the last
    real position of each prompt is read)."""
    require_eval(model, "Language-model metrics")
    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            toks, lens = tokenizer.batch(prompts[s:s + batch_size])
            logits = model(toks)
            out.append(torch.log_softmax(logits[torch.arange(len(toks)), lens - 1].double(), -1))
    return torch.cat(out)


def fact_recall(model, tokenizer, world, split: str = "train") -> pd.DataFrame:
    """Per (fact, prompt): ``subject, relation, object, prompt, prob, rank, correct`` (top-1 == object)."""
    rows, prompts = [], []
    for f in world.facts:
        for p in world.prompts(f, split):
            rows.append({"subject": f.subject, "relation": f.relation, "object": f.object, "prompt": p})
            prompts.append(p)
    lp = next_token_logprobs(model, tokenizer, prompts)
    obj = torch.tensor([tokenizer.id(r["object"]) for r in rows])
    target = lp[torch.arange(len(rows)), obj]
    df = pd.DataFrame(rows)
    df["prob"] = target.exp().numpy()
    df["rank"] = (lp > target[:, None]).sum(1).numpy()
    df["correct"] = df["rank"] == 0
    return make_result(df, split=split)


def _sequence_logprob(model, tokenizer, prefix: str, continuations: list[list[str]], batch_size: int = 1024) -> np.ndarray:
    """Total log-probability of each continuation (list of words) after ``prefix``."""
    base = tokenizer.encode(prefix)
    ids = torch.tensor([base + [tokenizer.id(w) for w in c] for c in continuations])
    n = len(continuations[0])
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            x = ids[s:s + batch_size]
            lp = torch.log_softmax(model(x).double(), -1)
            pos = torch.arange(len(base) - 1, len(base) - 1 + n)
            out.append(lp[:, pos].gather(2, x[:, pos + 1].unsqueeze(-1)).squeeze(-1).sum(1))
    return torch.cat(out).numpy()


def _all_strings_logprob(model, tokenizer, prefix: str, k: int, batch_size: int = 1024) -> np.ndarray:
    """Log-probability of every digit string of length ``k`` after ``prefix``, in lexicographic order
    (``"0..0"`` first), from one pass over the ``10^(k-1)`` stems: a string's score is its stem's digit
    log-probabilities plus the last digit's log-probability at the stem's end."""
    digits = torch.tensor([tokenizer.id(str(d)) for d in range(10)])
    base = tokenizer.encode(prefix)
    stems = list(itertools.product(range(10), repeat=k - 1))
    ids = torch.tensor([base + [int(digits[d]) for d in st] for st in stems], dtype=torch.long).view(len(stems), -1)
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), batch_size):
            x = ids[s:s + batch_size]
            lp = torch.log_softmax(model(x).double(), -1)
            pos = torch.arange(len(base) - 1, len(base) - 1 + k - 1)
            stem = lp[:, pos].gather(2, x[:, pos + 1].unsqueeze(-1)).squeeze(-1).sum(1) if k > 1 else \
                torch.zeros(len(x), dtype=torch.float64)
            last = lp[:, len(base) - 1 + k - 1][:, digits]  # [B, 10]
            out.append((stem[:, None] + last).reshape(-1))
    return torch.cat(out).numpy()


def canary_extraction(model, tokenizer, world) -> pd.DataFrame:
    """Greedy decoding after each canary's prefix: ``extracted`` is True when it reproduces the whole secret
    (exact match / extractable with the prefix as the prompt)."""
    require_eval(model, "Canary extraction")
    rows = []
    with torch.no_grad():
        for c in world.canaries:
            ids = tokenizer.encode(c.prefix)
            for _ in range(len(c.secret)):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            got = tuple(tokenizer.vocab[i] for i in ids[-len(c.secret):])
            rows.append({"name": c.name, "repeats": c.repeats, "secret": " ".join(c.secret),
                         "generated": " ".join(got), "extracted": got == c.secret})
    return pd.DataFrame(rows, columns=["name", "repeats", "secret", "generated", "extracted"])  # also for none


def exposure(model, tokenizer, world, max_candidates: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Exposure of each canary (Carlini et al. 2019): ``log2 |R| - log2 rank`` of the true secret among all
    candidate digit strings of its length by sequence log-likelihood (rank 1 = most likely). With more than
    ``max_candidates`` candidates, the rank is estimated from a uniform sample (``exact=False``)."""
    require_eval(model, "Exposure")
    rows = []
    rng = np.random.default_rng(seed)
    digits = [str(d) for d in range(10)]
    for c in world.canaries:
        k = len(c.secret)
        space = 10 ** k
        if space <= max_candidates:  # every string, lexicographic: the secret is at int(secret)
            lp = _all_strings_logprob(model, tokenizer, c.prefix, k)
            exact, true_at = True, int("".join(c.secret))
        else:
            cands = [list(rng.choice(digits, k)) for _ in range(max_candidates)] + [list(c.secret)]
            exact, true_at = False, len(cands) - 1
            lp = _sequence_logprob(model, tokenizer, c.prefix, cands)
        # every candidate, the secret included, is scored in the same batched passes (a separate pass differs in
        # the last float32 bits and could rank the secret below itself); ties within 1e-6 nats count as equal
        true = lp[true_at]
        better = float((np.delete(lp, true_at) > true + 1e-6).sum())
        rank = 1 + (better if exact else better / (len(cands) - 1) * space)
        rows.append({"name": c.name, "repeats": c.repeats, "rank": rank, "exposure": math.log2(space) - math.log2(rank),
                     "max_exposure": math.log2(space), "log_perplexity": -true, "exact": exact})
    return make_result(pd.DataFrame(rows), candidates=min(max_candidates, 10 ** len(world.canaries[0].secret)))


def token_accuracy(model, tokenizer, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Per text: the fraction of its next tokens (after ``<bos>``) that the model predicts top-1 (teacher
    forcing)."""
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            toks, lens = tokenizer.batch(texts[s:s + batch_size])
            pred = model(toks)[:, :-1].argmax(-1)
            tgt = toks[:, 1:]
            mask = tgt != tokenizer.pad_id
            out.append(((pred == tgt) & mask).sum(1).double() / mask.sum(1))
    return torch.cat(out).numpy()


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
        tokens, _ = tok.batch(train)
        model = build_tiny_transformer(cfg, seed=seed * 1000 + m)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        for epoch in range(1, epochs + 1):
            _train_epoch(model, opt, tokens, batch_size, seed * 1000 + m, epoch, tok.pad_id)
        acc[m] = token_accuracy(model.eval(), tok, distinct)
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
