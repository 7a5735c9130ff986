"""Membership inference on sequences: the language-model attack suite of OpenUnlearning / MUSE.

Every attack gives each text a **membership score, higher = more likely a member** (the negated statistic where
the paper's is lower-for-members), so one ROC convention serves all:

- ``loss``: ``-mean NLL`` per token (Yeom et al.).
- ``zlib``: ``-mean NLL / zlib entropy``, the entropy being ``len(zlib.compress(text.encode()))`` bytes (Carlini et
  al. 2021; OpenUnlearning's ``loss / zlib``).
- ``mink``: the mean of the lowest ``k`` share of the text's token log-probabilities (Min-K%, Shi et al. 2024;
  ``k`` 0.2 by default, at least one token).
- ``minkpp``: the same over the tokens' standardized log-probabilities ``(log p(x_t) - mu_t) / sigma_t``, ``mu_t``
  and ``sigma_t`` the mean and standard deviation of ``log p(z)`` under the model's next-token distribution
  ``p`` (Min-K%++, Zhang et al. 2024).
- ``reference``: ``-(NLL_target - NLL_reference)`` per token with a second model (Carlini et al. 2021's reference
  calibration; the reference model must share the tokenizer).
- ``gradnorm``: ``-||grad_theta mean NLL||_2`` over all trainable parameters (members sit at small gradients);
  ``gradnorm="per_tensor"``: OpenUnlearning's ``-mean over parameter tensors of ||grad||_2`` (it also runs the
  model in train mode; memloc keeps eval mode).

OpenUnlearning's scores are the same statistics with the sign flipped (higher = non-member) and its AUC labels the
holdout as positive, so its AUC equals memloc's (both: P(a member scores as more member-like than a non-member)).
Departures: Min-K% keeps at least one token (as OpenUnlearning; the original takes ``int(k n)``); OpenUnlearning's
configs use ``k = 0.4`` (its code default and Shi et al.'s is 0.2, memloc's default); zlib compresses the whole text
here (OpenUnlearning: the answer only, which is all it scores); OpenUnlearning drops the final (EOS) token.

Scored tokens: every token predicted from the ones before it (the first real token from BOS when the handle
prepends one, by its policy; without BOS the first token is only conditioned on).
"""
from __future__ import annotations

import zlib
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..results import make_result
from ..validate import ConfigError, choice, number
from .privacy import roc_summary

ATTACKS = ("loss", "zlib", "mink", "minkpp", "reference", "gradnorm")


# ---------------------------------------------------------------------------------------------------------------
# the statistics, on arrays (hand-checkable)


def mink_score(logprobs: np.ndarray, k: float = 0.2) -> float:
    """Mean of the lowest ``max(1, int(k * n))`` of the ``n`` token log-probabilities (Min-K%; the reference
    takes ``int(k * n)``, which is empty for short texts)."""
    lp = np.sort(np.asarray(logprobs, dtype=np.float64))
    n = max(1, int(k * len(lp)))
    return float(lp[:n].mean())


def minkpp_score(logprobs: np.ndarray, mu: np.ndarray, sigma: np.ndarray, k: float = 0.2) -> float:
    """Min-K%++: :func:`mink_score` of ``(logprobs - mu) / sigma`` per token."""
    z = (np.asarray(logprobs, np.float64) - np.asarray(mu, np.float64)) / np.asarray(sigma, np.float64)
    return mink_score(z, k)


def zlib_entropy(text: str) -> int:
    """Bytes of ``text`` (UTF-8) after zlib compression (the reference's "zlib entropy")."""
    return len(zlib.compress(text.encode("utf-8")))


def privleak(auc_unlearned: float, auc_retain: float) -> float:
    """MUSE's PrivLeak, ``(AUC_unlearned - AUC_retain) / AUC_retain x 100``, from two forget-vs-holdout AUCs in
    memloc's convention (higher = the forget set looks like members: 0.5 = cannot tell). MUSE's AUC is the other
    way round, so, like OpenUnlearning (``privacy.py``: ``score = 1 - AUC``), this computes
    ``((1 - auc_unlearned) - (1 - auc_retain)) / (1 - auc_retain) x 100``: 0 = as private as the retain model
    (never shown the forget set), **negative = leaking** (under-unlearned; MUSE's un-unlearned models sit near
    -100), positive = over-unlearned. Both AUCs should come from the same attack (MUSE / OpenUnlearning: Min-K%,
    k 0.4)."""
    number("auc_unlearned", auc_unlearned, lo=0.0, hi=1.0)
    number("auc_retain", auc_retain, lo=0.0, hi=1.0, hi_open=True)
    ref = 1.0 - auc_retain
    return float(((1.0 - auc_unlearned) - ref) / ref * 100)


# ---------------------------------------------------------------------------------------------------------------
# forward passes


def token_statistics(lm, texts: Sequence[str], batch_size: int = 32) -> list[dict]:
    """Per text: ``logprobs`` of its tokens (each given the ones before), ``mu`` and ``sigma`` of ``log p`` under
    the model's next-token distribution at those positions, ``nll`` (mean), ``n`` (scored tokens)."""
    from .lm import _lm

    lm = _lm(lm)
    out = []
    with torch.no_grad():
        for b in range(0, len(texts), batch_size):
            chunk = list(texts[b:b + batch_size])
            tokens, lengths = lm.batch(chunk)
            logits = lm.logits(tokens.to(lm.device)).float()
            logp = logits[:, :-1].log_softmax(-1)
            p = logp.exp()
            mu = (p * logp).sum(-1)
            sigma = ((p * logp.pow(2)).sum(-1) - mu.pow(2)).clamp_min(1e-12).sqrt()
            tok = logp.gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0]
            for i, L in enumerate(lengths.tolist()):
                n = L - 1
                if n < 1:
                    raise ConfigError(f"Text {chunk[i]!r} has fewer than two tokens; nothing to score.")
                lp = tok[i, :n].cpu().double().numpy()
                out.append({"logprobs": lp, "mu": mu[i, :n].cpu().double().numpy(),
                            "sigma": sigma[i, :n].cpu().double().numpy(), "nll": float(-lp.mean()), "n": n})
    return out


def _grad_norms(lm, texts: Sequence[str], per_tensor: bool = False) -> np.ndarray:
    from ..models.transformer import lm_loss
    from .lm import _lm

    lm = _lm(lm)
    model = lm.model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("GradNorm needs trainable parameters; every parameter of the model is frozen.")
    norms = []
    for t in texts:
        tokens, lengths = lm.batch([t])
        loss = lm_loss(model, tokens.to(lm.device), lengths.to(lm.device))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        gs = [g.double() for g in grads if g is not None]
        norms.append(float(torch.stack([g.norm() for g in gs]).mean()) if per_tensor
                     else float(torch.sqrt(sum((g ** 2).sum() for g in gs))))
    return np.asarray(norms)


def attack_scores(lm, texts: Sequence[str], attacks: Sequence[str] = ("loss", "zlib", "mink", "minkpp"),
                  reference=None, k: float = 0.2, batch_size: int = 32, gradnorm: str = "global") -> pd.DataFrame:
    """One row per text, one membership-score column per attack (higher = member; module docstring)."""
    texts = list(texts)
    if not texts:
        raise ConfigError("No texts given.")
    for a in attacks:
        choice("attack", a, ATTACKS)
    number("k", k, lo=0.0, hi=1.0, lo_open=True)
    choice("gradnorm", gradnorm, ("global", "per_tensor"))
    if "reference" in attacks and reference is None:
        raise ConfigError("The reference attack needs reference= (a second LM handle with the same tokenizer).")
    st = token_statistics(lm, texts, batch_size)
    df = pd.DataFrame({"text": texts, "n_tokens": [s["n"] for s in st], "nll": [s["nll"] for s in st]})
    if "loss" in attacks:
        df["loss"] = -df.nll
    if "zlib" in attacks:
        df["zlib"] = [-s["nll"] / zlib_entropy(t) for s, t in zip(st, texts)]
    if "mink" in attacks:
        df["mink"] = [mink_score(s["logprobs"], k) for s in st]
    if "minkpp" in attacks:
        df["minkpp"] = [minkpp_score(s["logprobs"], s["mu"], s["sigma"], k) for s in st]
    if "reference" in attacks:
        ref = token_statistics(reference, texts, batch_size)
        if [r["n"] for r in ref] != list(df.n_tokens):
            raise ConfigError("The reference model tokenizes the texts differently; it must share the tokenizer.")
        df["reference"] = [-(s["nll"] - r["nll"]) for s, r in zip(st, ref)]
    if "gradnorm" in attacks:
        df["gradnorm"] = -_grad_norms(lm, texts, per_tensor=gradnorm == "per_tensor")
    return df


def sequence_attacks(lm, members: Sequence[str], nonmembers: Sequence[str],
                     attacks: Sequence[str] = ("loss", "zlib", "mink", "minkpp", "gradnorm"), reference=None,
                     k: float = 0.2, batch_size: int = 32, gradnorm: str = "global") -> pd.DataFrame:
    """Each attack on ``members`` vs ``nonmembers``: one row per attack with ``auc``, ``tpr_at_1%_fpr``,
    ``tpr_at_0.1%_fpr`` (:func:`memloc.analyses.privacy.roc_summary`'s rule) and ``lowest_fpr`` = 1 / #non-members,
    the smallest FPR the data can show: where it is above 1% (or 0.1%), that column is the TPR at zero false
    positives. ``attrs["scores"]``: the per-text scores."""
    members, nonmembers = list(members), list(nonmembers)
    if not members or not nonmembers:
        raise ConfigError(f"Need members and non-members; got {len(members)} and {len(nonmembers)}.")
    if "reference" in attacks and reference is None:
        attacks = [a for a in attacks if a != "reference"]
    sc = attack_scores(lm, members + nonmembers, attacks, reference, k, batch_size, gradnorm)
    sc["member"] = [True] * len(members) + [False] * len(nonmembers)
    rows = []
    nn = len(nonmembers)
    for a in attacks:
        s = sc[a].to_numpy()
        m = sc.member.to_numpy()
        r = roc_summary(s, m)
        rows.append({"attack": a, "auc": r["auc"], "tpr_at_1%_fpr": r["tpr_at_1%_fpr"],
                     "tpr_at_0.1%_fpr": r["tpr_at_0.1%_fpr"], "lowest_fpr": r["lowest_fpr"]})
    out = make_result(pd.DataFrame(rows), attacks=list(attacks), k=k, gradnorm=gradnorm, n_members=len(members),
                      n_nonmembers=nn, convention="higher score = member", **_settings(lm))
    out.attrs["scores"] = sc
    return out


def _settings(lm) -> dict:
    from .lm import _lm

    return dict(_lm(lm).settings)


def membership_sets(world, n_facts: int = 200, n_canaries: int = 32, seed: int = 0) -> dict[str, tuple[list, list]]:
    """Members and non-members of the same format from a fact world (``{set: (members, non-members)}``):
    ``"canaries"``: the inserted canary texts vs ``n_canaries`` never-inserted ones made the same way
    (:func:`memloc.data.facts.holdout_canaries`); ``"facts"``: ``n_facts`` true fact statements (the first
    training template and the object) vs as many counterfactual ones (the same prompt with another object of the
    relation, never in the training text; :func:`memloc.data.facts.counterfactual_texts`)."""
    from ..data.facts import counterfactual_texts, holdout_canaries

    out = {}
    if world.canaries:
        out["canaries"] = (list(dict.fromkeys(c.text for c in world.canaries)),
                           [c.text for c in holdout_canaries(world, n_canaries)])
    rng = np.random.default_rng(seed + 5)
    facts = [world.facts[int(i)] for i in rng.permutation(len(world.facts))[:n_facts]]
    non = counterfactual_texts(world, len(facts), seed)
    out["facts"] = ([f"{world.prompts(f)[0]} {f.object}" for f in facts][:len(non)], non)
    return out


def lm_attack_suite(lm, world, attacks: Sequence[str] = ("loss", "zlib", "mink", "minkpp", "gradnorm"),
                    reference=None, n_facts: int = 200, k: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """:func:`sequence_attacks` on each of :func:`membership_sets` (canaries and facts) of a fact world; one row
    per set and attack (``reference`` adds the reference attack)."""
    attacks = list(attacks) + (["reference"] if reference is not None and "reference" not in attacks else [])
    parts = []
    for name, (mem, non) in membership_sets(world, n_facts, seed=seed).items():
        t = sequence_attacks(lm, mem, non, attacks, reference, k)
        parts.append(t.assign(set=name, n_members=len(mem), n_nonmembers=len(non)))
    out = pd.concat(parts, ignore_index=True)
    cols = ["set", "attack", "auc", "tpr_at_1%_fpr", "tpr_at_0.1%_fpr", "lowest_fpr", "n_members", "n_nonmembers"]
    return make_result(out[cols], attacks=attacks, k=k, n_facts=n_facts, seed=seed,
                       convention="higher score = member; TPR at 1% / 0.1% FPR is the TPR at zero false positives "
                                  "where lowest_fpr is above it", **_settings(lm))
