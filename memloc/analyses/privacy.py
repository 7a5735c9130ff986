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

__all__ = ["lira_scores", "loss_attack_scores", "roc_summary", "membership_inference"]


def _norm_logpdf(x, mu, sd):
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd)


def lira_scores(ens, target: int, online: bool = True, fixed_variance: bool = False) -> np.ndarray:
    """LiRA membership scores ``[n_train]`` of model ``target`` (higher = member), shadows = the other models.

    Online: ``log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out)`` with per-example means (medians, as in the
    reference) and standard deviations over IN / OUT shadows; offline: ``(phi - mu_out) / s_out`` (the one-sided
    test against the OUT distribution). ``fixed_variance`` uses one global standard deviation per side.
    Examples with no IN (or OUT) shadow get NaN.
    """
    shadows = np.delete(np.arange(ens.n_models), target)
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
