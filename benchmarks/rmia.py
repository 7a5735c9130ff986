"""RMIA vs LiRA with the same number of reference models (1, 2, 4, 8, 64), on digits and on the default classifier
testbed (cnn1d, MNIST-1D, 10% flipped labels), one ensemble of 65 models each (random halves of the training set,
``train_ensemble(..., ratio=0.5)``), 4 target models in turn (``memloc.analyses.privacy.rmia_vs_lira``).

Reported per data set: AUC, TPR at 1% and 0.1% FPR (the lowest FPR the non-members allow is in the table: below it
the TPR is at zero false positives) and the share of examples each attack can score. RMIA: a 0.3, gamma 1.
Results: ``benchmarks/results/rmia.json``.

    python benchmarks/rmia.py [--threads 2] [--models 65] [--datasets digits,mnist1d]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "rmia.json"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", type=int, default=65)
    ap.add_argument("--datasets", default="digits,mnist1d")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from memloc.analyses.privacy import rmia_vs_lira
    from memloc.data import inject_label_noise, load_dataset
    from memloc.ensemble import train_ensemble
    from memloc.results import write_json

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = f"{a.threads} torch threads, CPU"
    for name in a.datasets.split(","):
        data = inject_label_noise(load_dataset(name), 0.1, seed=0)
        t0 = time.perf_counter()
        kw = ({"model": "mlp", "model_kwargs": {"hidden": [256]}, "lr": 1e-2, "batch_size": 32, "epochs": 40}
              if name == "digits" else {"model": "cnn1d"})
        ens = train_ensemble(data, a.models, 0.5, progress=False, **kw)
        secs = time.perf_counter() - t0
        t = rmia_vs_lira(ens, n_references=(1, 2, 4, 8, 64), n_targets=4)
        results[name] = {"ensemble": {k: ens.settings.get(k) for k in ("model", "n_models", "ratio", "epochs", "lr",
                                                                        "fit_own_subset", "fit_own_subset_noisy")},
                         "ensemble_seconds": round(secs, 1), "settings": {k: v for k, v in t.attrs["settings"].items()
                                                                          if k != "ensemble"},
                         "table": json.loads(t.to_json(orient="records"))}
        write_json(results, RESULTS)
        print(name, f"{a.models} models in {secs:.0f} s", results[name]["ensemble"], "\n", t.round(3).to_string(index=False),
              flush=True)


if __name__ == "__main__":
    main()
