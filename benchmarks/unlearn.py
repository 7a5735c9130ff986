"""Unlearning the flipped labels of the default testbed: the comparison table, and whether its two headline
claims survive other seeds.

1. ``compare_unlearning(run, "noisy")`` with every method at its defaults (the table `memloc unlearn` prints;
   the oracle and finished rows are reused from RUN/unlearn/noisy/).
2. Seeds 1..N of the localized reset (``reset_finetune``) against its layer-matched random control
   (``random_reset``) and of ``finetune``, scored against the same oracle.

    python benchmarks/unlearn.py [--run reports/default/run] [--seeds 3] [--threads 1]
        [--out benchmarks/results/unlearn.json]

The run must exist (``make investigate``, or ``memloc train --out runs/default``).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="reports/default/run")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for the seed check (%(default)s)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/unlearn.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from memloc.edit.unlearn import (ClassifierTask, compare_unlearning, evaluate_unlearning, forget_split,
                                     train_oracle, unlearn)
    from memloc.train import Run

    run = Run(a.run)
    t0 = time.perf_counter()
    table = compare_unlearning(run, "noisy", progress=False)
    compare_s = time.perf_counter() - t0
    cols = ["method", "forget_acc", "forget_acc_original", "retain_acc", "test_acc", "mia_auc", "ks_stat", "ks_p",
            "changed_entries", "steps", "seconds"]
    print(table[cols].round(3).to_string(index=False), flush=True)

    data = run.data()
    task, split = ClassifierTask(data), forget_split(data, "noisy")
    oracle = train_oracle(run, split.forget, Path(table.attrs["settings"]["oracle"]), progress=False)
    oracle_losses = task.per_example(oracle.model(), split.forget).loss.to_numpy()
    seeds = []
    for seed in range(a.seeds):
        for method in ("reset_finetune", "random_reset", "finetune"):
            new, rec = unlearn(run.model(), task, split.forget, split.retain, method, seed=seed)
            r = evaluate_unlearning(new, task, split, oracle_losses, seed=0)
            row = {"seed": seed, "method": method, **{k: round(v, 4) for k, v in r.items() if not k.startswith("_")},
                   "seconds": rec["seconds"]}
            seeds.append(row)
            print(json.dumps(row), flush=True)
    res = {"setting": f"default testbed {run.path} (cnn1d, MNIST-1D, 10% flipped, seed {run.config.seed}); forget = "
                      f"the {len(split.forget)} flipped examples; method defaults (memloc.edit.unlearn.DEFAULTS); "
                      f"{a.threads} thread(s); {platform.processor() or platform.machine()}",
           "table": table[cols].round(4).to_dict("records"), "table_settings": table.attrs["settings"],
           "compare_seconds_with_reuse": round(compare_s, 1), "seeds": seeds}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
