"""Similarity and intrinsic-dimension speed and memory, memloc against the straightforward numpy way of the same
formula (the reference implementations' algorithms, re-implemented in plain numpy), in one run.

Inputs (float64, seeded): two 10,000 examples x 512 features activation matrices sharing a 64-dim signal
(ReLU), and 10,000 points in R^100 on a 10-dim subspace. Reference ways:
  CCA    google/svcca get_cca_similarity: np.cov of the stacked matrices, pinv, matrix square roots, SVD
  SVCCA  google tutorial: SVD of each centred 512 x 10000 matrix, keep 99% of variance, then the CCA above
  PWCCA  google/svcca compute_pwcca: the CCA above, QR of 10000 x 512 directions, weights
  CKA    Kornblith et al. feature_space_linear_cka
  TwoNN  Ansuini et al. IDNN: full N x N distance matrix (scipy pdist + squareform), sorted rows, fit
         and scikit-dimension's TwoNN
Peak memory is numpy's allocations traced by tracemalloc.

    python benchmarks/probes.py [--threads 2] [--n 10000]
"""
from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np


def ref_cca(a1, a2):  # neurons x datapoints
    n1 = a1.shape[0]
    sigma = np.cov(a1, a2)
    sxx, sxy, syy = sigma[:n1, :n1], sigma[:n1, n1:], sigma[n1:, n1:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)

    def sqrtm(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    ix, iy = sqrtm(np.linalg.pinv(sxx)), sqrtm(np.linalg.pinv(syy))
    u, s, v = np.linalg.svd(ix @ sxy @ iy)
    return u, np.abs(s)


def ref_mean_cca(x, y):
    return ref_cca(x.T, y.T)[1].mean()


def ref_svcca(x, y, keep=0.99):
    red = []
    for a in (x.T, y.T):
        c = a - a.mean(1, keepdims=True)
        u, s, v = np.linalg.svd(c, full_matrices=False)
        k = int(np.searchsorted(np.cumsum(s ** 2) / np.sum(s ** 2), keep) + 1)
        red.append(s[:k, None] * v[:k])
    return ref_cca(*red)[1].mean()


def ref_pwcca(x, y):
    a1 = x.T
    u, s = ref_cca(a1, y.T)
    mu = a1.mean(1, keepdims=True)
    p, _ = np.linalg.qr((u.T @ (a1 - mu) + mu).T)
    w = np.abs(p.T @ a1.T).sum(1)
    return float((w / w.sum() * s).sum())


def ref_cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def ref_twonn(X, fraction=0.9):
    from scipy.spatial.distance import pdist, squareform

    d = np.sort(squareform(pdist(X)), axis=1)
    mu = np.sort(d[:, 2] / d[:, 1])
    n = len(mu)
    k = int(n * fraction)
    xs, ys = np.log(mu[:k]), -np.log(1 - np.arange(1, k + 1) / n)
    return (xs @ ys) / (xs @ xs)


def measure(fn, *args, repeat=2):
    fn(*args)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        val = fn(*args)
        best = min(best, time.perf_counter() - t0)
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return float(val), best, peak / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--out", default="benchmarks/results/probes.json")
    a = ap.parse_args()
    from threadpoolctl import threadpool_limits

    import skdim
    from memloc.analyses.dimension import TwoNN
    from memloc.analyses.similarity import linear_cka, mean_cca, pwcca, svcca

    rng = np.random.default_rng(0)
    z = rng.normal(size=(a.n, 64))
    x = np.maximum(z @ rng.normal(size=(64, 512)) + rng.normal(size=(a.n, 512)), 0)
    y = np.maximum(z @ rng.normal(size=(64, 512)) + rng.normal(size=(a.n, 512)), 0)
    pts = rng.normal(size=(a.n, 10)) @ rng.normal(size=(10, 100))
    cases = [("CCA (mean)", mean_cca, ref_mean_cca, (x, y)),
             ("SVCCA (99% of squared s)", svcca, ref_svcca, (x, y)),
             ("PWCCA (reference=True: google's formula)", lambda p, q: pwcca(p, q, reference=True), ref_pwcca, (x, y)),
             ("PWCCA (memloc default: centred)", pwcca, ref_pwcca, (x, y)),
             ("linear CKA", linear_cka, ref_cka, (x, y)),
             ("TwoNN (vs IDNN full distances)", lambda p: TwoNN().fit(p).dimension_, ref_twonn, (pts,)),
             ("TwoNN (vs scikit-dimension)", lambda p: TwoNN().fit(p).dimension_,
              lambda p: skdim.id.TwoNN().fit(p).dimension_, (pts,))]
    rows = []
    with threadpool_limits(a.threads):
        for name, mine, ref, args in cases:
            vm, tm, mm = measure(mine, *args)
            vr, tr, mr = measure(ref, *args, repeat=1)
            row = {"method": name, "memloc_s": round(tm, 3), "reference_s": round(tr, 3),
                   "speedup": round(tr / tm, 1), "memloc_peak_MB": round(mm, 1), "reference_peak_MB": round(mr, 1),
                   "memloc_value": vm, "reference_value": vr}
            rows.append(row)
            print(json.dumps(row), flush=True)
    res = {"setting": f"{a.n} examples x 512 features (x2), TwoNN on {a.n} points in R^100 (10-dim subspace), "
                      f"float64, {a.threads} threads, best of 2 warm runs", "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
