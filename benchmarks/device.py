"""Training throughput of ResNet-9 on CIFAR-shaped data through memloc.train: CPU vs CUDA (fp32 and bf16), in one run.

The data are random 3x32x32 images with 10 classes (CIFAR-10's shape; nothing is downloaded), 10% flipped labels.
Each setting trains ``--epochs`` epochs with memloc's full bookkeeping (per-example minibatch records, an
evaluation pass over all examples and a checkpoint after every epoch) and reports training images per second
(steps only) and wall seconds per epoch (everything). Settings a machine lacks are skipped and say so. A
check that the run's analyses work on the device follows: rewinding one layer and greedy ablation of 4
examples on the GPU run, compared with the same calls on the CPU copy of the same checkpoints.

    python benchmarks/device.py [--threads 2] [--n 5000] [--epochs 2] [--width 1.0]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=5000, help="training images (plus n/5 test images)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--width", type=float, default=1.0, help="ResNet-9 width multiplier (1.0 = 64-128-256)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/device.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import memloc
    from memloc.locate import greedy_flip, rewind_layers

    g = np.random.default_rng(0)
    n, m = a.n, a.n // 5
    x = g.standard_normal((n + m, 3, 32, 32)).astype(np.float32)
    y = g.integers(0, 10, n + m)
    data = memloc.inject_label_noise(memloc.from_arrays(x[:n], y[:n], x[n:], y[n:], name="cifar-shaped"), 0.1, seed=0)
    cfg = {"model": "resnet9", "model_kwargs": {"width": a.width}, "optimizer": "sgd", "lr": 0.05,
           "batch_size": a.batch_size, "epochs": a.epochs, "stop_at_train_acc": None, "seed": 0}
    settings = [("cpu", "fp32")]
    if torch.cuda.is_available():
        settings += [("cuda", "fp32"), ("cuda", "bf16")]
    res = {"threads": a.threads, "n_train": n, "epochs": a.epochs, "width": a.width, "batch_size": a.batch_size,
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "rows": []}
    tmp = Path(tempfile.mkdtemp())
    runs = {}
    try:
        for dev, prec in settings:
            t0 = time.perf_counter()
            run = memloc.train({**cfg, "precision": prec}, tmp / f"{dev}-{prec}", data=data, device=dev, progress=False)
            wall = time.perf_counter() - t0
            s = run.summary
            row = {"device": dev, "precision": prec, "train_images_per_s": round(n * s["epochs"] / s["seconds"], 1),
                   "wall_s_per_epoch": round(wall / s["epochs"], 2), "train_acc": round(s["train_acc"], 3)}
            res["rows"].append(row)
            runs[(dev, prec)] = run
            print(json.dumps(row), flush=True)
        if ("cuda", "fp32") in runs:
            gpu = runs[("cuda", "fp32")]
            cpu = memloc.Run(gpu.path, device="cpu")
            ra = rewind_layers(gpu, layers=["layers.0"], epochs=[0], progress=False)
            rb = rewind_layers(cpu, layers=["layers.0"], epochs=[0], progress=False)
            ids = data.example_id.numpy()[data.group == "noisy"][:4]
            fa = greedy_flip(gpu.model(), data, ids, progress=False, eval_size=200)
            fb = greedy_flip(cpu.model(), data, ids, progress=False, eval_size=200)
            res["gpu_vs_cpu_analyses"] = {
                "rewind_max_accuracy_difference": float(np.abs(ra.accuracy.values - rb.accuracy.values).max()),
                "greedy_flip_same_units": [list(u) for u in fa.units] == [list(u) for u in fb.units]}
            print(json.dumps(res["gpu_vs_cpu_analyses"]), flush=True)
        rows = {(r["device"], r["precision"]): r for r in res["rows"]}
        if ("cuda", "fp32") in rows:
            res["speedup_cuda_fp32_vs_cpu"] = round(rows[("cuda", "fp32")]["train_images_per_s"] /
                                                    rows[("cpu", "fp32")]["train_images_per_s"], 1)
            res["speedup_cuda_bf16_vs_cpu"] = round(rows[("cuda", "bf16")]["train_images_per_s"] /
                                                    rows[("cpu", "fp32")]["train_images_per_s"], 1)
        else:
            res["note"] = "no CUDA device on this machine: only the CPU row was measured"
    finally:
        shutil.rmtree(tmp)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
