"""Similarity of two representations of the same examples: CCA, SVCCA, PWCCA and CKA.

Every function takes two activation matrices **examples x features** (``x: [n, p1]``, ``y: [n, p2]``, numpy
arrays or torch tensors; extra trailing dimensions are flattened into features). The google/svcca reference
code takes the transpose (neurons x datapoints); pass ``x.T`` to it when comparing. Everything is computed in
float64 from the cross-product matrices (no ``n x n`` Gram matrix, no ``n x p`` SVD), so 10,000 examples cost
no more memory than the activations themselves.

Choices, documented because the reference code differs:

- **CCA** centres each feature and drops directions of (numerically) zero variance, so dead ReLU units do not
  add zero coefficients; the coefficient vector has ``min(rank x, rank y)`` entries. On full-rank inputs the
  coefficients equal google/svcca's ``cca_coef1`` (``epsilon=0``). :func:`mean_cca` is the *plain* mean; the
  reference's ``result["mean"]`` (mean of the coefficients covering 98% of their sum) is
  :func:`cca_summary`'s ``"mean_thresholded"``.
- **SVCCA** keeps, per side, the top principal directions explaining ``keep_variance`` (default 0.99) of the
  variance, variance meaning squared singular values of the centred activations (the paper's reading;
  ``variance="singular"`` gives the tutorial's unsquared rule), or exactly ``k`` of them; the ``k`` used is
  reported by :func:`svcca_details`.
- **PWCCA** (Morcos et al. 2018) weighs each canonical correlation by how much of the *centred* activations
  its canonical variate accounts for: ``alpha_i = sum_j |<h_i, x_j>|`` with ``h_i`` the (orthonormal) canonical
  variates of the side with fewer features and ``x_j`` its centred neurons. It works in both argument orders.
  The reference uses uncentred neurons (so adding a constant changes it) and unwhitened directions, and fails
  when the first matrix is the larger; ``reference=True`` reproduces its computation step by step (without the
  failure), dead units included.
- **CKA** is linear CKA in feature space; ``debiased=True`` uses the unbiased HSIC estimator.
  :class:`MinibatchCKA` accumulates the unbiased HSIC over batches (Nguyen et al. 2021), so CKA over many
  examples never needs them all in memory; with one batch it equals debiased CKA exactly.
"""
from __future__ import annotations

import warnings
from typing import Literal

import numpy as np

__all__ = ["cca_coefficients", "mean_cca", "cca_summary", "svcca", "svcca_details", "pwcca", "linear_cka",
           "MinibatchCKA", "similarity", "METHODS"]

_TOL = 1e-10  # relative eigenvalue threshold below which a direction has no variance


def _as2d(a, name: str) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim > 2:
        a = a.reshape(len(a), -1)
    if a.ndim != 2 or len(a) < 2:
        raise ValueError(f"{name} must be an examples x features matrix with at least 2 examples; "
                         f"got shape {list(a.shape)}.")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return a


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as2d(x, "x"), _as2d(y, "y")
    if len(x) != len(y):
        raise ValueError(f"x and y must hold the same examples (rows): got {len(x)} and {len(y)} rows. "
                         "Both are examples x features.")
    return x, y


def _centre(a: np.ndarray) -> np.ndarray:
    return a - a.mean(0, keepdims=True)


def _whitener(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(W, V)``: ``W = V diag(1/sqrt(lambda))`` over the non-null eigenvectors ``V`` of ``cov``, so that
    ``W.T @ cov @ W = I``."""
    evals, evecs = np.linalg.eigh(cov)
    keep = evals > _TOL * max(evals.max(), 0.0) if evals.size else np.zeros(0, bool)
    return evecs[:, keep] / np.sqrt(evals[keep]), evecs[:, keep]


def _cca(x: np.ndarray, y: np.ndarray, check: bool = True) -> dict:
    """Centred CCA. Returns ``s`` (coefficients), ``ax``/``ay`` (``xc @ ax`` are the orthonormal canonical
    variates), ``ux``/``uy`` (singular vectors in the eigenbases ``vx``/``vy``), covariances ``sxx``/``syy``,
    and the centred matrices."""
    n, p1, p2 = len(x), x.shape[1], y.shape[1]
    if check:
        if n <= max(p1, p2):
            raise ValueError(f"CCA needs more examples than features: got {n} examples for {p1} and {p2} features "
                             "(every direction would correlate perfectly). Use svcca(..., k=...) with k < n, "
                             "linear_cka, or more examples.")
        if n < 5 * (p1 + p2):
            warnings.warn(f"CCA with {n} examples for {p1}+{p2} features is biased upwards (independent data "
                          "gives large coefficients until n is many times p1+p2); consider SVCCA or CKA.",
                          stacklevel=3)
    xc, yc = _centre(x), _centre(y)
    sxx, syy = xc.T @ xc, yc.T @ yc
    wx, vx = _whitener(sxx)
    wy, vy = _whitener(syy)
    out = {"xc": xc, "yc": yc, "sxx": sxx, "syy": syy, "vx": vx, "vy": vy}
    if wx.shape[1] == 0 or wy.shape[1] == 0:
        return {**out, "s": np.zeros(0)}
    sxy = xc.T @ yc
    m = wx.T @ sxy @ wy
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return {**out, "s": np.clip(s, 0.0, 1.0), "ax": wx @ u, "ay": wy @ vt.T, "sxy": sxy, "wx": wx, "wy": wy}


def cca_coefficients(x, y) -> np.ndarray:
    """Canonical correlations (descending) between ``x [n, p1]`` and ``y [n, p2]`` (examples x features)."""
    return _cca(*_pair(x, y))["s"]


def mean_cca(x, y) -> float:
    """Plain mean of the canonical correlations of ``x [n, p1]`` and ``y [n, p2]`` (examples x features)."""
    s = cca_coefficients(x, y)
    return float(s.mean()) if s.size else 0.0


def cca_summary(x, y, threshold: float = 0.98) -> dict:
    """Named summaries of the CCA coefficients: ``mean``, ``mean_squared``, ``mean_thresholded`` (google/svcca's
    ``result["mean"]``: mean of the leading coefficients covering ``threshold`` of their sum), ``coefficients``."""
    if not 0 < threshold <= 1:
        raise ValueError(f"The 'threshold' parameter must be in (0, 1]. Got {threshold!r} instead.")
    s = cca_coefficients(x, y)
    if s.size == 0:
        return {"mean": 0.0, "mean_squared": 0.0, "mean_thresholded": 0.0, "coefficients": s}
    # google/svcca sum_threshold: the first i with sum(s[:i]) >= threshold * sum(s), i.e. the coefficients up to and
    # including the first whose cumulative sum reaches the threshold (all of them when only the last one does)
    cum = np.cumsum(s)
    keep = int(np.argmax(cum / cum[-1] >= threshold)) + 1 if cum[-1] > 0 else len(s)
    return {"mean": float(s.mean()), "mean_squared": float((s ** 2).mean()),
            "mean_thresholded": float(s[:keep].mean()), "coefficients": s}


def _top_directions(a: np.ndarray, keep_variance: float | None, k: int | None, variance: str) -> np.ndarray:
    ac = _centre(a)
    evals, evecs = np.linalg.eigh(ac.T @ ac)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0, None), evecs[:, order]
    rank = int((evals > _TOL * max(evals[0], 0)).sum()) if len(evals) else 0
    if k is not None:
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"The 'k' parameter must be an int in [1, inf). Got {k!r} instead.")
        kk = min(int(k), rank)
    else:
        w = evals[:rank] if variance == "squared" else np.sqrt(evals[:rank])
        frac = np.cumsum(w) / w.sum()
        kk = int(np.searchsorted(frac, keep_variance - 1e-12) + 1)
    return ac @ evecs[:, :max(kk, 1)]


def svcca_details(x, y, keep_variance: float = 0.99, k: int | None = None,
                  variance: Literal["squared", "singular"] = "squared") -> dict:
    """SVCCA (Raghu et al. 2017) with the numbers behind it: ``svcca`` (mean CCA of the reduced
    representations), ``k_x``, ``k_y`` (directions kept), ``coefficients``, and the rule used.

    ``x [n, p1]``, ``y [n, p2]`` are examples x features. Keep ``k`` directions per side, or as many as explain
    ``keep_variance`` of the variance (``variance="squared"``: squared singular values, the paper's reading;
    ``"singular"``: unsquared, the google tutorial's).
    """
    if variance not in ("squared", "singular"):
        raise ValueError(f"The 'variance' parameter must be 'squared' or 'singular'. Got {variance!r} instead.")
    if k is None and not (0 < keep_variance <= 1):
        raise ValueError(f"The 'keep_variance' parameter must be in (0, 1]. Got {keep_variance!r} instead.")
    x, y = _pair(x, y)
    rx = _top_directions(x, keep_variance, k, variance)
    ry = _top_directions(y, keep_variance, k, variance)
    if len(x) <= max(rx.shape[1], ry.shape[1]):
        raise ValueError(f"SVCCA kept {rx.shape[1]} and {ry.shape[1]} directions for {len(x)} examples; CCA needs "
                         "more examples than directions. Pass a smaller k.")
    if len(x) < 5 * (rx.shape[1] + ry.shape[1]):  # the same rule as plain CCA's warning
        warnings.warn(f"SVCCA with {len(x)} examples for {rx.shape[1]}+{ry.shape[1]} kept directions is biased upwards "
                      "(independent data gives large coefficients until n is many times the directions); pass a "
                      "smaller k, use more examples, or use CKA.", stacklevel=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = _cca(rx, ry, check=False)["s"]
    return {"svcca": float(s.mean()) if s.size else 0.0, "k_x": rx.shape[1], "k_y": ry.shape[1],
            "coefficients": s, "keep_variance": None if k is not None else keep_variance, "k": k,
            "variance": variance}


def svcca(x, y, keep_variance: float = 0.99, k: int | None = None,
          variance: Literal["squared", "singular"] = "squared") -> float:
    """SVCCA similarity of ``x [n, p1]`` and ``y [n, p2]`` (examples x features); see :func:`svcca_details`."""
    return svcca_details(x, y, keep_variance, k, variance)["svcca"]


def _pwcca_google(x: np.ndarray, y: np.ndarray, epsilon: float) -> float:
    """google/svcca ``compute_pwcca(x.T, y.T, epsilon)`` step by step (``get_cca_similarity``'s covariance rescaling,
    ``remove_small``, pseudo-inverse square roots, SVD; directions ``u^T (x - mean) + mean`` orthonormalised by QR;
    weights from the uncentred neurons), with the side of fewer features passed first (the reference raises
    IndexError otherwise) and negative round-off eigenvalues of the pseudo-inverse clipped to 0 (the reference takes
    their square root and fails with "SVD did not converge")."""
    if x.shape[1] > y.shape[1]:
        x, y = y, x
    a1, a2 = x.T, y.T  # neurons x datapoints
    n1 = len(a1)
    cov = np.cov(a1, a2)
    sxx, sxy, syy = cov[:n1, :n1], cov[:n1, n1:], cov[n1:, n1:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    if xmax == 0 or ymax == 0:
        return 0.0
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    xi, yi = np.abs(np.diag(sxx)) >= epsilon, np.abs(np.diag(syy)) >= epsilon
    if not xi.any() or not yi.any():
        return 0.0  # the reference's all-zero result
    sxx, syy, sxy = sxx[xi][:, xi], syy[yi][:, yi], sxy[xi][:, yi]

    def invsqrt(c):
        w, v = np.linalg.eigh(np.linalg.pinv(c + epsilon * np.eye(len(c))))
        return v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T

    u, s, vt = np.linalg.svd(invsqrt(sxx) @ sxy @ invsqrt(syy))
    s = np.abs(s)
    if xi.sum() <= yi.sum():
        acts, coef = a1[xi], u.T
    else:  # the reference indexes acts1 here (google/svcca#9); the y side is meant
        acts, coef = a2[yi], vt
    mu = acts.mean(1, keepdims=True)
    q, _ = np.linalg.qr((coef @ (acts - mu) + mu).T)
    weights = np.abs(q.T @ acts.T).sum(1)
    weights = weights / weights.sum()
    return float(np.sum(weights * s))


def pwcca(x, y, reference: bool = False, epsilon: float = 0.0) -> float:
    """Projection-weighted CCA (Morcos et al. 2018) of ``x [n, p1]`` and ``y [n, p2]`` (examples x features).

    Default: weights from the centred neurons and the whitened canonical variates of the side with fewer
    features (see the module docstring). ``reference=True`` follows google/svcca ``compute_pwcca(x.T, y.T,
    epsilon)`` step by step, in either argument order: directions ``u^T (x - mean) + mean`` orthonormalised by QR,
    weights from the uncentred neurons; ``epsilon`` drops neurons whose variance (relative to the layer's largest)
    is below it and regularises, as there. Dead (constant) units are kept at ``epsilon=0``, as in the reference:
    each adds a zero coefficient that still takes a share of the weights, so they lower the value.
    """
    x, y = _pair(x, y)
    if reference:
        if not epsilon >= 0:
            raise ValueError(f"The 'epsilon' parameter must be a float >= 0. Got {epsilon!r} instead.")
        if len(x) <= max(x.shape[1], y.shape[1]):
            raise ValueError(f"CCA needs more examples than features: got {len(x)} examples for {x.shape[1]} and "
                             f"{y.shape[1]} features.")
        return _pwcca_google(x, y, float(epsilon))
    if epsilon:
        raise ValueError("The 'epsilon' parameter applies to reference=True only (the default drops directions of "
                         "zero variance itself).")
    r = _cca(x, y)
    s = r["s"]
    if s.size == 0:
        return 0.0
    side = "x" if x.shape[1] <= y.shape[1] else "y"
    a, cov = (r["ax"], r["sxx"]) if side == "x" else (r["ay"], r["syy"])
    # canonical variates h = cen @ a are orthonormal, so sum_j |<h_i, x_j>| = |a^T cov|, no n-sized product
    weights = np.abs(a.T @ cov).sum(1)
    weights = weights / weights.sum()
    return float((weights * s).sum())


def linear_cka(x, y, debiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019) of ``x [n, p1]`` and ``y [n, p2]`` (examples x features).

    Feature-space form ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``; ``debiased=True`` uses the unbiased
    HSIC estimator (Song et al. 2012; can be slightly negative for independent data). Invariant to orthogonal
    transforms and isotropic scaling of either side.
    """
    x, y = _pair(x, y)
    xc, yc = _centre(x), _centre(y)
    if not debiased:
        xy = np.linalg.norm(yc.T @ xc) ** 2
        xx, yy = np.linalg.norm(xc.T @ xc), np.linalg.norm(yc.T @ yc)
        return float(xy / (xx * yy)) if xx > 0 and yy > 0 else 0.0
    n = len(x)
    if n < 4:
        raise ValueError(f"Debiased CKA needs at least 4 examples; got {n}.")

    def hsic(a, b):
        sa, sb = (a ** 2).sum(1), (b ** 2).sum(1)
        return (np.linalg.norm(b.T @ a) ** 2 - n / (n - 2) * (sa @ sb)
                + sa.sum() * sb.sum() / ((n - 1) * (n - 2)))

    xy, xx, yy = hsic(xc, yc), hsic(xc, xc), hsic(yc, yc)
    return float(xy / np.sqrt(xx * yy)) if xx > 0 and yy > 0 else 0.0


class MinibatchCKA:
    """Linear CKA accumulated over minibatches with the unbiased HSIC (Nguyen et al. 2021).

    ``update(x_b, y_b)`` with ``[b, p1]`` / ``[b, p2]`` batches of the same examples (b >= 4), then ``value()``.
    Memory is one ``b x b`` Gram per side. With a single batch this equals ``linear_cka(..., debiased=True)``.
    """

    def __init__(self):
        self.xy = self.xx = self.yy = 0.0
        self.n_batches = self.n_examples = 0

    @staticmethod
    def _ucentre(g: np.ndarray) -> np.ndarray:
        n = len(g)
        g = g.copy()
        np.fill_diagonal(g, 0)
        means = g.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        g -= means[:, None]
        g -= means[None, :]
        np.fill_diagonal(g, 0)
        return g

    def update(self, x, y) -> "MinibatchCKA":
        x, y = _pair(x, y)
        if len(x) < 4:
            raise ValueError(f"Each minibatch needs at least 4 examples; got {len(x)}.")
        k, l_ = self._ucentre(x @ x.T), self._ucentre(y @ y.T)
        self.xy += float((k * l_).sum())
        self.xx += float((k * k).sum())
        self.yy += float((l_ * l_).sum())
        self.n_batches += 1
        self.n_examples += len(x)
        return self

    def value(self) -> float:
        if self.n_batches == 0:
            raise ValueError("MinibatchCKA has seen no batch; call update(x, y) first.")
        return self.xy / np.sqrt(self.xx * self.yy) if self.xx > 0 and self.yy > 0 else 0.0


METHODS = {"cka": linear_cka, "cca": mean_cca, "svcca": svcca, "pwcca": pwcca}


def similarity(x, y, method: str = "cka", **kwargs) -> float:
    """Similarity of ``x [n, p1]`` and ``y [n, p2]`` (examples x features) by name: cka | cca | svcca | pwcca."""
    if method not in METHODS:
        raise ValueError(f"Unknown similarity method {method!r}; valid methods are {sorted(METHODS)}.")
    return METHODS[method](x, y, **kwargs)
