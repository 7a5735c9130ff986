"""Mask localizers (HardConcrete, Slimming): training the masks of many targets in one batch against one target
at a time, in one run (``memloc.locate.localize``, ``batched=True`` vs ``batched=False``; the scores agree to
float rounding). Also the time of every localizer per target set.

Models: an MLP (64-256-256-10) trained on digits with 10% flipped labels (targets: its memorized noisy
examples) and the word language testbed (2 layers, d_model 64, d_mlp 256; targets: memorized training texts,
3-token prefix, 2-token suffix). Results: ``benchmarks/results/localize_masks.json``.

    python benchmarks/localize_masks.py [--threads 2] [--targets 16] [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results" / "localize_masks.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--targets", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300, help="mask steps (fixed: the stop rule is switched off so both "
                                                           "paths do the same work)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from memloc.analyses.lm import memorized_sequences
    from memloc.data.facts import make_fact_world
    from memloc.locate.groundtruth import memorized_noisy
    from memloc.locate.localize import classifier_targets, localize, sequence_targets
    from memloc.models.transformer import train_lm
    from memloc.results import write_json
    from memloc.train import train

    tmp = Path(tempfile.mkdtemp())
    run = train({"dataset": "digits", "noise": 0.1, "model": "mlp", "model_kwargs": {"hidden": [256, 256]},
                 "lr": 1e-2, "batch_size": 64, "epochs": 100, "seed": 3}, tmp / "clf", progress=False)
    model, data = run.model().eval(), run.data()
    pos = memorized_noisy(model, data)[:a.targets]
    world = make_fact_world(40, n_canaries=4, canary_digits=3, canary_repeats=(1, 8), seed=0)
    lmrun = train_lm(world, tmp / "lm", n_layers=2, d_model=64, d_mlp=256, epochs=200, lr=3e-3, progress=False)
    lm = lmrun.lm()
    mem = memorized_sequences(lm, world.training_text(), prefix_tokens=3, suffix_tokens=2)
    mem = mem[mem.extractable.fillna(False).astype(bool)].head(a.targets)
    cases = {"classifier (MLP 256-256, digits)": classifier_targets(model, data.x[pos], data.y[pos]),
             "language model (word testbed, 2x256 FFN units)": sequence_targets(lm, mem)}
    out = {"machine": f"{a.threads} torch threads, CPU", "targets": a.targets, "mask_steps": a.steps, "cases": {}}
    for name, t in cases.items():
        entry = {"n_targets": t.n, "units": t.total}
        for m in ("hardconcrete", "slimming"):
            # stop=1e-9: never reached, both paths run exactly `steps` steps
            t0 = time.perf_counter()
            b = localize(t, m, max_steps=a.steps, stop=1e-9)
            tb = time.perf_counter() - t0
            t0 = time.perf_counter()
            s = localize(t, m, max_steps=a.steps, stop=1e-9, batched=False)
            ts = time.perf_counter() - t0
            entry[m] = {"batched_s": round(tb, 3), "one_at_a_time_s": round(ts, 3), "speedup": round(ts / tb, 2),
                        "max_score_difference": float(np.abs(b.score.values - s.score.values).max())}
            print(name, m, entry[m], flush=True)
        for m in ("zero_out", "ig", "activations", "random"):
            t0 = time.perf_counter()
            localize(t, m)
            entry[m] = {"seconds": round(time.perf_counter() - t0, 3)}
        out["cases"][name] = entry
    write_json(out, RESULTS)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
