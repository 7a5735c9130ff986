"""INJ and DEL (Chang et al., NAACL 2024) on the two default testbeds, every localizer, one command.

- Classifier: the default testbed (``memloc.train()``'s defaults: cnn1d on MNIST-1D, 10% flipped labels). INJ at
  ratios ``--ratios`` (``--repeats`` injections each, 20 fresh test examples with flipped labels); DEL on 20
  memorized noisy examples at fractions 1-10% of each layer's channels.
- Language model: the default GPT-2 testbed (``memloc.models.gpt2.train_gpt2`` defaults; reused from ``--work``).
  INJ on ``--texts`` fresh counterfactual biographies sentences at ratio 2% of each layer's FFN units; DEL on 10
  memorized training sequences (8-token prefix, 8-token suffix) at 0.5-5% of each layer's units, perplexity on
  200 held-out-template texts.
- The mask methods at MemPi's GPT-2 settings and, to examine the ordering, with a weaker sparsity weight
  (``hardconcrete_lam10``: lam 10; ``slimming_lam150``: lam 150).

Results: ``benchmarks/results/localize_groundtruth.json`` (tables per benchmark, settings, seconds).

    python benchmarks/localize_groundtruth.py [--threads 2] [--parts clf_inj,clf_del,lm_inj,lm_del] [--work runs/localize_groundtruth]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

RESULTS = Path(__file__).parent / "results" / "localize_groundtruth.json"
VARIANTS = {"hardconcrete_lam10": ("hardconcrete", {"lam": 10.0}), "slimming_lam150": ("slimming", {"lam": 150.0})}


def _with_variants(run_fn, methods, **kw):
    """Run the benchmark for the plain methods, then each variant (renamed), and stack the tables."""
    tables = [run_fn(methods=methods, **kw)]
    for name, (m, opts) in VARIANTS.items():
        t = run_fn(methods=[m], method_options={m: opts}, **kw)
        t = t.assign(method=name)
        tables.append(t)
    out = pd.concat(tables, ignore_index=True)
    out.attrs = tables[0].attrs
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="clf_inj,clf_del,lm_inj,lm_del")
    ap.add_argument("--ratios", default="0.02,0.05,0.1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--texts", type=int, default=5)
    ap.add_argument("--work", default="runs/localize_groundtruth")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from memloc.analyses.lm import memorized_sequences
    from memloc.data.bios import make_bio_world
    from memloc.data.facts import counterfactual_texts
    from memloc.locate.groundtruth import (CLASSIFIER_METHODS, LM_METHODS, deletion_benchmark,
                                           deletion_benchmark_lm, describe_groundtruth,
                                           injection_benchmark, injection_benchmark_lm, summarize_deletion)
    from memloc.models.gpt2 import train_gpt2
    from memloc.results import write_json
    from memloc.train import train

    work = Path(a.work)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["machine"] = f"{a.threads} torch threads, CPU"
    parts = a.parts.split(",")

    def record(name, table, extra=None):
        summary = (table.groupby(["method", "ratio"] if "ratio" in table else "method", sort=False)
                   .agg(recall=("recall", "mean"), sd=("recall", "std"), baseline=("baseline", "mean"),
                        seconds=("seconds", "mean")).reset_index()
                   if "recall" in table else summarize_deletion(table))
        results[name] = {"settings": table.attrs.get("settings", {}), "summary": json.loads(summary.to_json(
            orient="records")), **(extra or {})}
        write_json(results, RESULTS)
        print(name, "\n", describe_groundtruth(table) if "ratio" not in table else summary.round(3).to_string(),
              flush=True)

    if any(p.startswith("clf") for p in parts):
        t0 = time.perf_counter()
        run = train(out=work / "classifier", progress=False)
        print(f"classifier testbed {time.perf_counter() - t0:.0f} s", flush=True)
        if "clf_inj" in parts:
            tabs = []
            for r in [float(x) for x in a.ratios.split(",")]:
                t = _with_variants(lambda **kw: injection_benchmark(run, ratio=r, n_examples=20, repeats=a.repeats,
                                                                    progress=False, **kw), list(CLASSIFIER_METHODS))
                tabs.append(t.assign(ratio=r))
            tab = pd.concat(tabs, ignore_index=True)
            tab.attrs = tabs[0].attrs
            record("classifier_inj", tab, {"fitted": float(tab.fitted.mean()),
                                           "test_acc_before": float(tab.test_acc_before.mean()),
                                           "test_acc_after_injection": float(tab.test_acc_after_injection.mean())})
        if "clf_del" in parts:
            record("classifier_del", _with_variants(lambda **kw: deletion_benchmark(run, n_targets=20, progress=False,
                                                                                   **kw), list(CLASSIFIER_METHODS)))
    if any(p.startswith("lm") for p in parts):
        world = make_bio_world(seed=0)
        t0 = time.perf_counter()
        lmrun = train_gpt2(world, work / "gpt2", progress=False)
        lm = lmrun.lm()
        print(f"GPT-2 testbed {time.perf_counter() - t0:.0f} s", flush=True)
        if "lm_inj" in parts:
            texts = counterfactual_texts(world, a.texts, seed=0)
            tab = _with_variants(lambda **kw: injection_benchmark_lm(lm, texts, ratio=0.02, progress=False, **kw),
                                 list(LM_METHODS))
            record("lm_inj", tab.assign(ratio=0.02), {"texts": texts, "final_loss": float(tab.final_loss.max())})
        if "lm_del" in parts:
            mem = memorized_sequences(lm, world.training_text(), prefix_tokens=8, suffix_tokens=8)
            held = [f"{p} {f.object}" for f in world.facts for p in world.prompts(f, "heldout")][:200]
            tab = _with_variants(lambda **kw: deletion_benchmark_lm(lm, mem, held, n_targets=10, progress=False, **kw),
                                 list(LM_METHODS))
            record("lm_del", tab, {"extractable": int(mem.extractable.fillna(False).sum()), "texts": len(mem)})


if __name__ == "__main__":
    main()
