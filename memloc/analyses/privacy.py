"""Membership inference: the loss-threshold attack and LiRA (Carlini et al. 2022), with shadow models from an
:class:`~memloc.ensemble.Ensemble` (the same machinery as Feldman-Zhang memorization).

Evaluation follows the LiRA code: each of ``n_targets`` models in turn is the target, the remaining models are
its shadows; the attack scores every training example, members are the examples the target trained on. Reported:
AUC and TPR at 0.1% and 1% FPR, over all training examples and per group (clean / noisy), averaged over
targets. The statistic is ``phi = log p_y - log sum_{y' != y} p_y'`` of the training label (no augmentation).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..results import make_result

__all__ = ["lira_scores", "loss_attack_scores", "roc_summary", "membership_inference", "rmia_scores",
           "rmia_vs_lira"]


def _norm_logpdf(x, mu, sd):
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd)


def lira_scores(ens, target: int, online: bool = True, fixed_variance: bool = False,
                references=None) -> np.ndarray:
    """LiRA membership scores ``[n_train]`` of model ``target`` (higher = member), shadows = the other models
    (or the models ``references``).

    Online: ``log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)`` with per-example means (medians, as in the
    reference) and standard deviations over IN / OUT shadows; offline: ``(phi - mu_out) / s_out`` (the one-sided
    test against the OUT distribution). ``fixed_variance`` uses one global standard deviation per side.
    Examples with no IN (or OUT) shadow get NaN.
    """
    shadows = _references(ens, target, references)
    phi = ens.phi_train[shadows].astype(np.float64)
    m = ens.masks[shadows]
    x = ens.phi_train[target].astype(np.float64)
    out_vals = np.where(~m, phi, np.nan)
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mu_out = np.nanmedian(out_vals, 0)
            sd_out = np.full_like(mu_out, np.nanstd(out_vals)) if fixed_variance else np.nanstd(out_vals, 0)
            if not online:
                return (x - mu_out) / (sd_out + 1e-30)
            in_vals = np.where(m, phi, np.nan)
            mu_in = np.nanmedian(in_vals, 0)
            sd_in = np.full_like(mu_in, np.nanstd(in_vals)) if fixed_variance else np.nanstd(in_vals, 0)
    return _norm_logpdf(x, mu_in, sd_in + 1e-30) - _norm_logpdf(x, mu_out, sd_out + 1e-30)


def _references(ens, target: int, references) -> np.ndarray:
    from ..validate import ConfigError

    if not 0 <= int(target) < ens.n_models:
        raise ConfigError(f"target must be one of the ensemble's {ens.n_models} models; got {target}.")
    if references is None:
        return np.delete(np.arange(ens.n_models), target)
    refs = np.asarray(references, dtype=int).ravel()
    if len(refs) == 0 or int(target) in set(refs.tolist()) or refs.min() < 0 or refs.max() >= ens.n_models:
        raise ConfigError(f"references must be 1 or more of the ensemble's {ens.n_models} models, without the "
                          f"target {target}; got {refs.tolist()}.")
    return refs


def _trimmed_mean(x: np.ndarray, cut: float = 0.2) -> np.ndarray:
    """Column-wise ``scipy.stats.trim_mean(col[~isnan], cut)`` of ``x [k, n]`` (NaN = absent; NaN where a column
    has no value): ``int(cut * c)`` values cut from each end of the ``c`` present ones."""
    srt = np.sort(x, axis=0)  # NaN last
    c = (~np.isnan(x)).sum(0)
    lo = np.floor(cut * c).astype(int)
    hi = c - lo
    cs = np.vstack([np.zeros((1, x.shape[1])), np.cumsum(np.nan_to_num(srt), axis=0)])
    cols = np.arange(x.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(hi > lo, (cs[hi, cols] - cs[lo, cols]) / (hi - lo), np.nan)


def rmia_scores(ens, target: int, references=None, online: bool = False, a: float = 0.3, gamma: float = 1.0,
                population=None, max_population: int | None = None, seed: int = 0,
                invert_in: bool = True) -> np.ndarray:
    """RMIA membership scores ``[n_train]`` of model ``target`` (Zarifzadeh et al., ICML 2024; higher = member).

    ``Pr(x|theta) = p_y`` (the softmax probability of the training label, temperature 1: ``sigmoid(phi)``).
    ``Pr(x)`` over the reference models (default every other model; ``references`` picks them): online, the
    20%-trimmed mean over all of them (IN and OUT; the reference code's ``trim_mean(..., 0.2)``); offline, over the
    models that did not train on x, linearly corrected, ``(1 + a) / 2 * mean_out + (1 - a) / 2`` (``a`` 0.3: the
    reference's CIFAR-10 setting; NaN where no reference model left x out). ``LR(x, z) = (Pr(x|theta) / Pr(x)) /
    (Pr(z|theta) / Pr(z))`` against the population z (default: every training example the target did not train
    on, as the reference code; ``max_population`` subsamples it, seeded), and the score is the share of z with
    ``LR > gamma`` (``gamma`` 1: ml_privacy_meter's default and documentation; the paper's configs use 2, which on
    models that fit their training data well caps a member's ratio near the threshold), x's comparison with itself
    left out."""
    from ..validate import ConfigError, number

    number("a", a, lo=0.0, hi=1.0)
    number("gamma", gamma, lo=0.0, lo_open=True)
    refs = _references(ens, target, references)
    with np.errstate(over="ignore"):
        p = 1.0 / (1.0 + np.exp(-ens.phi_train.astype(np.float64)))
    px = p[target]
    ref = p[refs]
    if online:
        pr = _trimmed_mean(ref)
    else:
        ins = ens.masks[refs].astype(bool)
        out = np.where(~ins, ref, np.nan)
        if invert_in and a > 0:
            # ml_privacy_meter: a reference that trained on x stands in for an OUT one through the inverted linear
            # approximation P_IN = a P_OUT + (1 - a)  =>  P_OUT = (P_IN + a - 1) / a
            out = np.where(ins, np.clip((ref + a - 1) / a, 0.0, 1.0), out)
        pr = (1 + a) / 2 * _trimmed_mean(out) + (1 - a) / 2
    ratio = px / pr
    member = ens.masks[target].astype(bool)
    pop = np.flatnonzero(~member) if population is None else np.asarray(population, dtype=int)
    pop = pop[np.isfinite(ratio[pop])]
    if max_population is not None and len(pop) > max_population:
        pop = np.random.default_rng(seed).choice(pop, size=max_population, replace=False)
    if len(pop) < 2:
        raise ConfigError("RMIA needs at least 2 population examples with a finite likelihood ratio; with offline "
                          "references, every population example needs a reference model that left it out.")
    rz = np.sort(ratio[pop])
    # LR(x, z) > gamma  <=>  ratio_z < ratio_x / gamma
    count = np.searchsorted(rz, ratio / gamma, side="left").astype(np.float64)
    in_pop = np.isin(np.arange(len(ratio)), pop)
    self_hit = in_pop & (1.0 > gamma)  # x against itself: LR = 1
    score = np.where(in_pop, (count - self_hit) / (len(pop) - 1), count / len(pop))
    return np.where(np.isfinite(ratio), score, np.nan)


def rmia_vs_lira(ens, n_references=(1, 2, 4, 8, 64), n_targets: int = 4, a: float = 0.3, gamma: float = 1.0,
                 max_population: int | None = None, seed: int = 0) -> pd.DataFrame:
    """RMIA and LiRA with the same ``k`` reference models, for each ``k`` in ``n_references`` (those the ensemble
    allows: k <= n_models - 1) against ``n_targets`` models in turn (each target's references: a seeded draw of
    k of the other models). Rows ``attack, k, auc, tpr_at_1%_fpr, tpr_at_0.1%_fpr, lowest_fpr, coverage`` (means
    over targets; ``coverage`` = the share of examples the attack could score: offline attacks need a reference
    model that left the example out). Attacks: ``rmia_offline``, ``rmia_online`` (k >= 2), ``lira_offline``
    (one global variance for k < 64, as Carlini et al. advise for few shadow models), ``lira_online`` (k >= 2;
    global variance for k < 64), and the reference-free ``loss`` attack (k = 0)."""
    from ..validate import ConfigError

    if ens.n_models < 2:
        raise ConfigError(f"Needs at least 2 models (a target and a reference); the ensemble has {ens.n_models}.")
    ks = [int(k) for k in n_references if 1 <= int(k) <= ens.n_models - 1]
    if not ks:
        raise ConfigError(f"No k in {list(n_references)} fits an ensemble of {ens.n_models} models (k <= "
                          f"{ens.n_models - 1}).")
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(min(n_targets, ens.n_models)):
        mem = ens.masks[t].astype(bool)
        others = rng.permutation(np.delete(np.arange(ens.n_models), t))
        rows.append({"attack": "loss", "k": 0, "target": t, **roc_summary(loss_attack_scores(ens, t), mem),
                     "coverage": 1.0})
        for k in ks:
            refs = others[:k]
            attacks = {"rmia_offline": lambda: rmia_scores(ens, t, refs, False, a, gamma, max_population=max_population,
                                                           seed=seed),
                       "lira_offline": lambda: lira_scores(ens, t, False, k < 64, refs)}
            if k >= 2:
                attacks["rmia_online"] = lambda: rmia_scores(ens, t, refs, True, a, gamma,
                                                             max_population=max_population, seed=seed)
                attacks["lira_online"] = lambda: lira_scores(ens, t, True, k < 64, refs)
            for name, fn in attacks.items():
                sc = fn()
                rows.append({"attack": name, "k": k, "target": t, **roc_summary(sc, mem),
                             "coverage": float(np.isfinite(sc).mean())})
    df = pd.DataFrame(rows)
    cols = ["auc", "tpr_at_1%_fpr", "tpr_at_0.1%_fpr", "lowest_fpr", "coverage"]
    out = df.groupby(["attack", "k"], sort=False)[cols].mean().reset_index().sort_values(["k", "attack"])
    return make_result(out.reset_index(drop=True), n_targets=min(n_targets, ens.n_models), n_models=ens.n_models,
                       a=a, gamma=gamma, max_population=max_population, seed=seed,
                       signal="p_y = sigmoid(phi), temperature 1, no augmentation",
                       tpr_rule="tpr[np.where(fpr < x)[0][-1]]; TPR at zero false positives where lowest_fpr > x",
                       ensemble=ens.settings)


def loss_attack_scores(ens, target: int) -> np.ndarray:
    """Loss-threshold attack (Yeom et al.): members have low loss. ``phi`` is monotone in the loss, so it is the
    score (higher = member)."""
    return ens.phi_train[target].astype(np.float64)


def roc_summary(scores: np.ndarray, members: np.ndarray) -> dict:
    """AUC and TPR at 0.1% / 1% FPR of membership ``scores`` for boolean ``members`` (NaN scores dropped).

    TPR at x% FPR is tensorflow/privacy LiRA's rule, ``tpr[np.where(fpr < x)[0][-1]]``: the TPR of the last ROC
    point whose FPR is below x (a real threshold, no interpolation). ``lowest_fpr`` = 1 / #non-members is the
    smallest FPR above 0 that any threshold reaches: when it is above x, the figure is the TPR at zero false
    positives (with 43 non-members, "TPR at 1% FPR" is TPR at 0 false positives)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    ok = np.isfinite(scores)
    s, y = scores[ok], members[ok]
    n_neg = int((~y.astype(bool)).sum())
    if y.all() or not y.any():
        return {"auc": np.nan, "tpr_at_0.1%_fpr": np.nan, "tpr_at_1%_fpr": np.nan, "lowest_fpr": np.nan,
                "n": int(ok.sum())}
    fpr, tpr, _ = roc_curve(y, s)
    return {"auc": float(roc_auc_score(y, s)), "tpr_at_0.1%_fpr": float(tpr[np.where(fpr < 0.001)[0][-1]]),
            "tpr_at_1%_fpr": float(tpr[np.where(fpr < 0.01)[0][-1]]), "lowest_fpr": 1.0 / n_neg,
            "n": int(ok.sum())}


def membership_inference(ens, data, n_targets: int = 8) -> pd.DataFrame:
    """Loss attack and LiRA (online/offline x per-example/fixed variance) against ``n_targets`` models.

    Rows: ``attack, group, auc, tpr_at_0.1%_fpr, tpr_at_1%_fpr, lowest_fpr, n`` (means over targets), groups
    ``all``, ``clean``, ``noisy``. TPRs follow :func:`roc_summary` (tensorflow/privacy's rule); ``lowest_fpr`` is the
    smallest non-zero FPR the group's non-members allow: where it exceeds 1%, "TPR at 1% FPR" is the TPR at zero
    false positives.
    """
    if ens.n_models < 3:
        raise ValueError(f"Membership inference needs at least 3 models (a target and shadows); got {ens.n_models}.")
    groups = data.by_ids(ens.train_ids).group.astype(str)
    attacks = {"loss": lambda t: loss_attack_scores(ens, t)}
    for online in (True, False):
        for fixed in (False, True):
            name = f"lira_{'online' if online else 'offline'}{'_fixed_variance' if fixed else ''}"
            attacks[name] = lambda t, o=online, f=fixed: lira_scores(ens, t, o, f)
    rows = []
    for name, fn in attacks.items():
        per = {g: [] for g in ("all", "clean", "noisy")}
        for t in range(min(n_targets, ens.n_models)):
            sc, mem = fn(t), ens.masks[t]
            for g in per:
                sel = np.ones_like(mem) if g == "all" else groups == g
                if sel.any():
                    per[g].append(roc_summary(sc[sel], mem[sel]))
        for g, lst in per.items():
            if lst:
                rows.append({"attack": name, "group": g, **pd.DataFrame(lst).mean().to_dict()})
    return make_result(pd.DataFrame(rows), n_targets=min(n_targets, ens.n_models), shadows=ens.n_models - 1,
                       statistic="phi = log p_y - log(1 - p_y)",
                       tpr_rule="tpr[np.where(fpr < x)[0][-1]] (tensorflow/privacy LiRA); TPR at zero false "
                                "positives where lowest_fpr > x", **ens.settings)
