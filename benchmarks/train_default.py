"""How long the default memorization testbed takes, and what memloc's bookkeeping costs.

Side by side in one process, same data, model, initialisation, data order and number of epochs:
  memloc  memloc.train: per-example minibatch record, eval pass over all 5000 examples after each epoch,
          a safetensors checkpoint and a parquet part per epoch, resumable state
  bare    a plain PyTorch loop (forward, mean cross-entropy, backward, Adam step), nothing recorded

    python benchmarks/train_default.py [--threads 2] [--out benchmarks/results/train_default.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def bare_loop(cfg, data, epochs):
    from memloc.models import build_model
    from memloc.train import _epoch_order

    model = build_model(cfg.model, data.input_shape, data.num_classes, seed=cfg.seed, **cfg.model_kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train = data.train
    t0 = time.perf_counter()
    model.train()
    for epoch in range(1, epochs + 1):
        order = _epoch_order(cfg.seed, epoch, len(train))
        for b in range(0, len(train), cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        acc = (model(train.x).argmax(1) == train.y).float().mean().item()
    return seconds, acc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/train_default.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from memloc.data import load_mnist1d
    from memloc.train import TrainConfig, _build_data, train

    t0 = time.perf_counter()
    load_mnist1d()
    gen = time.perf_counter() - t0
    cfg = TrainConfig()
    tmp = Path(tempfile.mkdtemp())
    try:
        t0 = time.perf_counter()
        run = train(cfg, tmp / "run", progress=False)
        wall = time.perf_counter() - t0
        s = run.summary
        bare_s, bare_acc = bare_loop(cfg, _build_data(cfg), s["epochs"])
        disk = sum(p.stat().st_size for p in (tmp / "run").rglob("*") if p.is_file())
    finally:
        shutil.rmtree(tmp)
    res = {
        "setting": "default testbed: cnn1d (64-64-64, BN) on MNIST-1D 4000/1000, 10% flipped labels, seed 0, "
                   "Adam 3e-3, batch 128, until 100% train accuracy",
        "threads": a.threads, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "epochs": s["epochs"], "train_acc_clean": s["train_acc_clean"], "train_acc_noisy": s["train_acc_noisy"],
        "test_acc": s["test_acc"], "mnist1d_generation_s": round(gen, 2),
        "memloc_train_s": s["seconds"], "memloc_wall_s_incl_setup_and_finalize": round(wall, 2),
        "bare_loop_s": round(bare_s, 2), "bare_loop_train_acc": bare_acc,
        "overhead_ratio_memloc_over_bare": round(s["seconds"] / bare_s, 2), "run_folder_MB": round(disk / 1e6, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
