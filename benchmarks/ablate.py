"""Greedy neuron ablation: the batched path against the straightforward per-example loop, in one run.

Trains the default testbed (cnn1d, MNIST-1D, 10% flipped labels) and an MLP (40-256-256-10) on the same data,
then flips 256 random training examples with the batched path and the first 32 of them with the loop
(``method="loop"``: one example at a time, units zeroed in the real parameters). Reports examples per second
of both, their ratio, and whether the two picked the same units. ``compute_floor_s`` is the time a plain
forward + backward of the same number of rows takes at the batched pass size: the batched search cannot be
faster than that, because it must do the loop's arithmetic to pick the loop's units. Settings: with and without the
keep-the-batch term (batch of 64 = target + 63 random others), with and without measuring each example's
clean/test accuracy change (1000 + 1000 examples).

    python benchmarks/ablate.py [--threads 2] [--targets 256] [--loop-targets 32]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _row_cost(model, data, rows: int) -> float:
    """Seconds per row of one plain forward + activation-gradient backward at ``rows`` rows per pass."""
    import torch.nn.functional as F

    x, y = data.x[:rows], data.y[:rows]
    for p in model.parameters():
        p.requires_grad_(False)
    xi = x.clone().requires_grad_(True)
    F.cross_entropy(model(xi), y).backward()
    t0 = time.perf_counter()
    for _ in range(5):
        xi = x.clone().requires_grad_(True)
        F.cross_entropy(model(xi), y).backward()
    for p in model.parameters():
        p.requires_grad_(True)
    return (time.perf_counter() - t0) / (5 * len(x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--targets", type=int, default=256)
    ap.add_argument("--loop-targets", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/ablate.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from memloc.locate.ablate import greedy_flip
    from memloc.train import train

    tmp = Path(tempfile.mkdtemp())
    results = []
    try:
        runs = {"cnn1d": train(out=tmp / "cnn", progress=False),
                "mlp": train(out=tmp / "mlp", model="mlp", progress=False)}
        settings = [("keep term, search only", dict(eval_size=0)),
                    ("no keep term, search only", dict(eval_size=0, keep_weight=0.0, batch_size=1)),
                    ("keep term + accuracy changes", dict(eval_size=1000))]
        for name, run in runs.items():
            model, data = run.model(), run.data()
            rng = np.random.default_rng(0)
            ids = rng.choice(data.example_id.numpy()[data.split == "train"], a.targets, replace=False)
            greedy_flip(model, data, ids[:4], progress=False, eval_size=0)  # warm-up
            for label, kw in settings:
                t0 = time.perf_counter()
                b = greedy_flip(model, data, ids, progress=False, **kw)
                tb = time.perf_counter() - t0
                t0 = time.perf_counter()
                lp = greedy_flip(model, data, ids[:a.loop_targets], progress=False, method="loop", **kw)
                tl = time.perf_counter() - t0
                same = float(np.mean([x == y for x, y in zip(b.units[:a.loop_targets], lp.units)]))
                floor = None
                if kw.get("eval_size") == 0:  # the arithmetic the batched search cannot avoid
                    rows = b.attrs["settings"]["search_rows"]
                    floor = round(rows * _row_cost(model, data, 2048), 2)
                row = {"model": name, "setting": label, "batched_examples_per_s": round(a.targets / tb, 1),
                       "loop_examples_per_s": round(a.loop_targets / tl, 1),
                       "speedup": round((a.targets / tb) / (a.loop_targets / tl), 1), "same_units": same,
                       "median_units": float(b.n_units.median()), "batched_s": round(tb, 2),
                       "compute_floor_s": floor}
                results.append(row)
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp)
    res = {"setting": f"{a.targets} random training examples (batched) vs the first {a.loop_targets} (loop), "
                      f"default testbed runs, seed 0, float32, {a.threads} threads, max_rows=2048",
           "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
