"""Intrinsic dimension estimators, scikit-learn style: ``TwoNN().fit(X).dimension_``.

``X`` is points x features (numpy array or torch tensor; trailing dimensions are flattened). Nearest neighbours
come from a k-d/ball tree (scikit-learn), so memory grows linearly with the number of points (the reference
implementations build the full ``N x N`` distance matrix).

**Duplicates.** Identical rows (common in ReLU layers: e.g. all-zero activation vectors) have a zero
nearest-neighbour distance and break both estimators. memloc removes exact duplicate rows before estimating
(``duplicates="drop"``, the default) and reports how many in ``n_duplicates_``; ``duplicates="error"`` refuses
them. Distances are computed exactly (tree search on the coordinates), so identical rows give 0, not ~1e-7.
"""
from __future__ import annotations

import numpy as np

__all__ = ["TwoNN", "MLE", "intrinsic_dimension", "ESTIMATORS"]


def _points(X) -> np.ndarray:
    if hasattr(X, "detach"):
        X = X.detach().cpu().numpy()
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim > 2:
        X = X.reshape(len(X), -1)
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values.")
    return X


def _dedupe(X: np.ndarray, duplicates: str) -> tuple[np.ndarray, int]:
    if duplicates not in ("drop", "error"):
        raise ValueError(f"The 'duplicates' parameter must be 'drop' or 'error'. Got {duplicates!r} instead.")
    U = np.unique(X, axis=0)
    n_dup = len(X) - len(U)
    if n_dup and duplicates == "error":
        raise ValueError(f"X has {n_dup} duplicate rows; intrinsic dimension needs distinct points "
                         "(use duplicates='drop').")
    return (U if n_dup else X), n_dup


def _knn(X: np.ndarray, k: int) -> np.ndarray:
    """Distances ``[N, k]`` to the k nearest *other* points."""
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=k).fit(X).kneighbors(return_distance=True)[0]


class TwoNN:
    """TwoNN (Facco et al. 2017), as used by Ansuini et al. 2019.

    For each point ``mu = r2 / r1``; sort, take the empirical CDF ``F(i) = i / N``, drop the largest
    ``discard_fraction`` of the ratios and fit ``-log(1 - F) = d log(mu)`` through the origin (least squares), as
    scikit-dimension's ``TwoNN`` does. Ties (``r1 == r2``, ``mu = 1``) are kept.

    Attributes after ``fit``: ``dimension_``, ``n_points_`` (after de-duplication), ``n_duplicates_``.
    """

    def __init__(self, discard_fraction: float = 0.1, duplicates: str = "drop"):
        self.discard_fraction = discard_fraction
        self.duplicates = duplicates

    def fit(self, X) -> "TwoNN":
        if not 0 <= self.discard_fraction < 1:
            raise ValueError(f"The 'discard_fraction' parameter must be in [0, 1). Got {self.discard_fraction!r} instead.")
        X, self.n_duplicates_ = _dedupe(_points(X), self.duplicates)
        if len(X) < 3:
            raise ValueError(f"TwoNN needs at least 3 distinct points; got {len(X)}.")
        d = _knn(X, 2)
        mu = np.sort(d[:, 1] / d[:, 0])
        n = len(mu)
        keep = int(n * (1 - self.discard_fraction))
        if keep < 2:
            raise ValueError("Fewer than 2 points left after discarding; use more points or a smaller discard_fraction.")
        x = np.log(mu[:keep])
        y = -np.log(1 - np.arange(1, keep + 1) / n)
        x = np.where(x <= 1e-9, 0.0, x)  # equal distances up to rounding: mu = 1
        ties = float(np.mean(x == 0))
        if not x @ x > 0:
            from ..validate import MemlocError
            raise MemlocError(f"TwoNN is undefined on these {n} points: every point's second-nearest neighbour is as "
                              "near as its first (mu = 1), as on a regular grid or evenly spaced points on a line. "
                              "Use MLE, or add a little noise to the points.")
        if ties > 0.5:
            import warnings
            warnings.warn(f"{ties:.0%} of the points have their two nearest neighbours at the same distance (a grid or "
                          "evenly spaced points); TwoNN's estimate is unreliable here.", stacklevel=2)
        self.dimension_ = float((x @ y) / (x @ x))
        self.n_points_ = n
        return self


class MLE:
    """Levina-Bickel maximum-likelihood estimator with ``n_neighbors`` neighbours (default 20).

    Per point ``m_i = (k - 1) / sum_j log(T_k / T_j)`` (``unbiased=True``: ``k - 2``); combined by ``comb``:
    ``"mean"`` (Levina-Bickel's average) or ``"mle"`` (harmonic mean, MacKay-Ghahramani; scikit-dimension's
    default). Attributes after ``fit``: ``dimension_``, ``dimension_pw_`` (per point), ``n_duplicates_``.
    """

    def __init__(self, n_neighbors: int = 20, comb: str = "mean", unbiased: bool = False, duplicates: str = "drop"):
        self.n_neighbors, self.comb, self.unbiased, self.duplicates = n_neighbors, comb, unbiased, duplicates

    def fit(self, X) -> "MLE":
        if self.comb not in ("mean", "mle"):
            raise ValueError(f"The 'comb' parameter must be 'mean' or 'mle'. Got {self.comb!r} instead.")
        if not isinstance(self.n_neighbors, int) or self.n_neighbors < 3:
            raise ValueError(f"The 'n_neighbors' parameter must be an int in [3, inf). Got {self.n_neighbors!r} instead.")
        X, self.n_duplicates_ = _dedupe(_points(X), self.duplicates)
        k = min(self.n_neighbors, len(X) - 1)
        if k < 3:
            raise ValueError(f"MLE needs at least 4 distinct points; got {len(X)}.")
        d = _knn(X, k)
        kfac = k - 2 if self.unbiased else k - 1
        self.dimension_pw_ = kfac / np.log(d[:, -1:] / d).sum(1)
        self.dimension_ = float(self.dimension_pw_.mean() if self.comb == "mean"
                                else 1 / np.mean(1 / self.dimension_pw_))
        self.n_points_ = len(X)
        return self


ESTIMATORS = {"twonn": TwoNN, "mle": MLE}


def intrinsic_dimension(X, estimator: str = "twonn", **kwargs) -> float:
    """Intrinsic dimension of ``X [points, features]`` with ``twonn`` or ``mle``."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {estimator!r}; valid estimators are {sorted(ESTIMATORS)}.")
    return ESTIMATORS[estimator](**kwargs).fit(X).dimension_
