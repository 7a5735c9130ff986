"""Scores: ensemble training and loss curvature, batched against the straightforward way, in one run.

1. Ensemble: 64 small MLPs (digits, 70% subsets, hidden 256, Adam 1e-2, batch 32, 40 epochs -- the Feldman-Zhang
   setting of `memloc scores`) trained together with torch.func.vmap, against the same 64 models trained one
   after another (method="loop"); models per minute, and where the batched time goes (cProfile, by phase).
   Also a 40-128-10 MLP on MNIST-1D (batch 128, 30 epochs) for a smaller model, and a BatchNorm CNN (digits as
   8x8 images, memloc's cnn2d with 16-32 channels, each model with its own running statistics; batch 64, 10
   epochs) against the same models one at a time.
2. Curvature (n=10, h=1e-3) of all 4,000 MNIST-1D training examples on the default testbed's final model,
   batched over examples and directions against one example at a time (extrapolated from 200 examples).

    python benchmarks/scores.py [--threads 2] [--cases mlp,bn,curvature]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import torch


def ensemble_case(name, data, n, kw, loop_n):
    from memloc.ensemble import train_ensemble

    train_ensemble(data, 2, **kw, progress=False)  # warm-up
    t0 = time.perf_counter()
    train_ensemble(data, n, **kw, progress=False)
    tb = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_ensemble(data, loop_n, **kw, method="loop", progress=False)
    tl = time.perf_counter() - t0
    prof = cProfile.Profile()
    prof.enable()
    train_ensemble(data, n, **kw, progress=False)
    prof.disable()
    st = pstats.Stats(prof)
    total = sum(v[3] for k, v in st.stats.items() if k[2] == "train_ensemble")
    phase = {}
    for key, label in [("backward", "backward"), ("step", "optimizer step"), ("_orders", "data order"),
                       ("_evaluate", "final evaluation")]:
        phase[label] = sum(v[3] for k, v in st.stats.items() if k[2] == key and
                           (label != "optimizer step" or "optim" in k[0]))
    phase["forward and the rest"] = total - sum(phase.values())
    return {"case": name, "models": n, "batched_models_per_min": round(n / tb * 60, 1),
            "loop_models_per_min": round(loop_n / tl * 60, 1), "speedup": round((n / tb) / (loop_n / tl), 2),
            "time_share": {k: round(v / total, 3) for k, v in phase.items() if v}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/scores.json")
    ap.add_argument("--cases", default="mlp,bn,curvature", help="which cases to run (results of the others are kept)")
    a = ap.parse_args()
    cases = set(a.cases.split(","))
    torch.set_num_threads(a.threads)
    from memloc.analyses.scores import curvature
    from memloc.data import inject_label_noise, load_digits, load_mnist1d
    from memloc.train import train

    digits = inject_label_noise(load_digits(), 0.1, seed=0)
    m1d = inject_label_noise(load_mnist1d(), 0.1, seed=0)
    old = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    res = {"threads": a.threads, "ensemble": [r for r in old.get("ensemble", []) if not (
        ("mlp" in cases and "MLP" in r["case"]) or ("bn" in cases and "BatchNorm" in r["case"]))],
        "curvature": old.get("curvature")}
    todo = []
    if "mlp" in cases:
        todo += [lambda: ensemble_case("digits MLP 64-256-10, batch 32, 40 epochs", digits, 64,
                                       dict(model_kwargs={"hidden": [256]}, lr=1e-2, batch_size=32, epochs=40), 8),
                 lambda: ensemble_case("MNIST-1D MLP 40-128-10, batch 128, 30 epochs", m1d, 64,
                                       dict(model_kwargs={"hidden": [128]}, lr=1e-2, batch_size=128, epochs=30), 8)]
    if "bn" in cases:
        from dataclasses import replace
        images = replace(digits, x=digits.x.view(-1, 1, 8, 8))
        todo += [lambda: ensemble_case("digits cnn2d with BatchNorm (16-32 channels), batch 64, 10 epochs", images, 32,
                                       dict(model="cnn2d", model_kwargs={"channels": [16, 32]}, lr=1e-2,
                                            batch_size=64, epochs=10), 4)]
    for case in todo:
        row = case()
        res["ensemble"].append(row)
        print(json.dumps(row), flush=True)
    if "curvature" not in cases:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
        return

    tmp = Path(tempfile.mkdtemp())
    try:
        run = train(out=tmp / "run", progress=False)
        model, data = run.model(), run.data().train
        for p in model.parameters():
            p.requires_grad_(False)
        curvature(model, data.x[:100], data.y[:100])
        t0 = time.perf_counter()
        curvature(model, data.x, data.y)
        tb = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.cat([curvature(model, data.x[i:i + 1], data.y[i:i + 1]) for i in range(200)])
        tl = (time.perf_counter() - t0) * len(data) / 200
        row = {"case": f"cnn1d default testbed, {len(data)} examples, n=10, h=1e-3, one checkpoint",
               "batched_s": round(tb, 2), "one_at_a_time_s_extrapolated": round(tl, 1), "speedup": round(tl / tb, 1),
               "note": "directions differ between the two ways (drawn per position), so values are not compared"}
        res["curvature"] = row
        print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
