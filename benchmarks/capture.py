"""Batched activation capture against the straightforward per-example loop, in one run.

Captures the three conv blocks of the default cnn1d for the 5000 MNIST-1D examples both ways, checks that the
activations agree, and reports examples per second and the ratio.

    python benchmarks/capture.py [--threads 2] [--batch-size 512]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/capture.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from memloc.data import load_mnist1d
    from memloc.hooks import capture
    from memloc.models import build_model

    data = load_mnist1d()
    model = build_model("cnn1d", data.input_shape, 10, seed=0).eval()
    sites = ["layers.0", "layers.1", "layers.2"]
    capture(model, data.x[:64], sites)  # warm-up
    t0 = time.perf_counter()
    batched = capture(model, data, sites, batch_size=a.batch_size)
    tb = time.perf_counter() - t0

    t0 = time.perf_counter()
    loop = {s: [] for s in sites}
    for i in range(len(data)):  # the reference way: one forward per example, a hook per site
        got = capture(model, data.x[i:i + 1], sites, batch_size=1)
        for s in sites:
            loop[s].append(got[s])
    tl = time.perf_counter() - t0
    err = max((torch.cat(loop[s]) - batched[s]).abs().max().item() for s in sites)
    res = {"setting": f"cnn1d default, MNIST-1D 5000 examples, sites {sites}, batch {a.batch_size}",
           "threads": a.threads, "batched_examples_per_s": round(len(data) / tb),
           "loop_examples_per_s": round(len(data) / tl), "speedup": round(tl / tb, 1), "max_abs_difference": err}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
