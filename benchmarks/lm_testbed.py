"""Design of the default language testbed by measurement: train candidate designs of the GPT-2 testbed and measure,
for each, what the testbed is for.

Per design (data mixture, depth, width, steps; ``DESIGNS`` below):
- training time (seconds, torch threads given) and steps; fact recall on training templates and on held-out
  paraphrases (greedy decoding of the whole multi-token object); canary extraction and exposure by repeat count;
- causal tracing at the last subject token: mean indirect effect of restoring each layer's MLP output (window 1 and
  window 2, kmeng01/rome's truncated windows), and of the residual stream (window 1), over 40 known facts, with the
  peak layer;
- ROME at every layer, 20 single edits (C from the training text; kmeng01/rome's defaults): efficacy ES, paraphrase
  PS on the relation's held-out templates (never in the training text), neighbourhood NS, next to the unedited
  model's NS, and seconds per edit;
- Hase et al.: per edited fact, the layer where tracing's MLP effect peaks and the layer where ROME works best
  (rewrite + paraphrase margin), and their correlation;
- MEMIT, 100 edits at once over layers 1..max(1, L // 3) at the paper's clamp (0.75) and lambda 15000 and 5000:
  ES, PS, NS and the unedited facts kept; seconds per edit.

Results go to ``benchmarks/results/lm_testbed.json`` (one entry per design, written as each finishes; a design
already there is skipped unless --redo), the trained models to ``--work``.

    python benchmarks/lm_testbed.py [--threads 2] [--designs NAME,...] [--work runs/lm_testbed] [--redo]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

DESIGNS = {
    # name: (world settings for make_bio_world, testbed settings for train_gpt2, what it tests)
    "bios300_6x128": ({"n_people": 300}, {"steps": 650, "split_names": False, "vocab_size": 2048}, "the trial's best design (d4) with multi-word objects: 300 people, name once then "
                              "He/She, 650 steps"),
    "bios300_6x128_untied": ({"n_people": 300}, {"steps": 650, "tie_embeddings": False, "split_names": False, "vocab_size": 2048},
                             "untied input / output embeddings: does the first MLP stop acting as the embedding?"),
    "bios200_6x128_450": ({"n_people": 200}, {"steps": 450, "split_names": False, "vocab_size": 2048},
                          "fewer people, 450 steps (3 minutes): more passes over each fact per step"),
    "bios300_6x128_profiles2_450": ({"n_people": 300, "profiles": 2}, {"steps": 450, "split_names": False, "vocab_size": 2048},
                                    "plus 2 profiles per person (the name, then its attributes), 450 steps: predicting "
                                    "an attribute right after the name should make the model look it up at the name"),
    "bios200_6x128_400": ({"n_people": 200}, {"steps": 400, "split_names": False, "vocab_size": 2048},
                          "the previous default: fewer people, 400 steps, whole-name tokens"),
    "bios200_6x128_split_400": ({"n_people": 200}, {"steps": 400, "split_names": True, "vocab_size": 2048},
                                "names split into sub-word pieces (the tokenizer trained with other made-up names in "
                                "their place: 5.8 tokens per full name, as GPT-2 splits names it never saw), so the "
                                "early layers must assemble the subject before a fact can be looked up"),
    "bios200_6x128_split_300": ({"n_people": 200}, {"steps": 300, "split_names": True, "vocab_size": 2048},
                                "split names, 300 steps: within 3 minutes on 2 cores (the default)"),
    "bios200_6x128_split_v1024_400": ({"n_people": 200}, {"steps": 400, "split_names": True, "vocab_size": 1024},
                                      "split names with a 1,024-token vocabulary (7 tokens per full name): the output "
                                      "softmax over 2,048 tokens doubled the step time, so 400 steps fit 3 minutes"),
    "bios200_6x128_profiles2_450_untied": ({"n_people": 200, "profiles": 2}, {"steps": 450, "tie_embeddings": False, "split_names": False, "vocab_size": 2048},
                                           "profiles, fewer people and untied embeddings together"),
}

RESULTS = Path(__file__).parent / "results" / "lm_testbed.json"


def layer_means(df, bucket="last subject"):
    b = df[df.bucket == bucket].groupby("layer").ie.mean()
    return [round(float(v), 4) for v in b.values]


def evaluate(name, world_kw, tb_kw, work: Path, out: dict, save, n_rome=20, n_memit=100, trace_facts_n=40,
             only_known=True):
    """Measure what ``out`` (the design's entry so far) lacks, calling ``save()`` after each part."""
    from memloc.analyses.lm import canary_extraction, exposure
    from memloc.data.bios import make_bio_world
    from memloc.edit.evaluate import (make_requests, many_edits, request_scores, rome_by_layer, summarize,
                                      trace_vs_edit, world_facts_outside, batch_scores)
    from memloc.edit.rome import EditConfig, key_second_moment
    from memloc.locate.trace import trace_facts
    from memloc.models.gpt2 import train_gpt2

    world = make_bio_world(**world_kw)
    run = train_gpt2(world, work / name, progress=False, **tb_kw)
    s = run.summary
    lm = run.lm()
    L, d_mlp = lm.cfg.n_layers, lm.cfg.d_mlp
    if "train_seconds" not in out:
        out.update({"design": name, "world": world_kw, "testbed": tb_kw, "train_seconds": s["seconds"],
                    "train_threads": s["threads"], "steps": s["steps"], "n_params": s["n_params"],
                    "recall_train": s["fact_recall_train_templates"],
                    "recall_heldout": s["fact_recall_heldout_templates"], "canaries_extracted": s["canaries_extracted"]})
        ex = exposure(lm, world).merge(canary_extraction(lm, world)[["name", "extracted"]], on="name")
        out["canary_exposure"] = {str(r): round(float(g.exposure.mean()), 2) for r, g in ex.groupby("repeats")}
        save()
    if "trace_seconds" not in out:
        t0 = time.perf_counter()
        for kind, window in (("mlp", 1), ("mlp", 2), ("resid", 1)):
            tr = trace_facts(lm, world, kind, window=window, limit=trace_facts_n, progress=False,
                             only_known=only_known)
            m = layer_means(tr)
            out[f"trace_{kind}_w{window}"] = m
            out[f"trace_{kind}_w{window}_peak"] = int(np.argmax(m))
            out[f"trace_{kind}_w{window}_te"] = round(float(tr.drop_duplicates("subject").te.mean()), 3)
            out["trace_n_facts"] = tr.attrs["settings"]["n_facts"]
        out["trace_seconds"] = round(time.perf_counter() - t0, 1)
        save()
    text = world.training_text()
    cache = {}

    def C(l):
        if l not in cache:
            cache[l] = key_second_moment(lm, text, l)
        return cache[l]

    if "hase" not in out:
        recs = make_requests(world, n_rome, seed=0)
        unedited = request_scores(lm, recs)
        edits = rome_by_layer(lm, recs, C={l: C(l) for l in range(L)}, progress=False)
        out["rome_unedited_ns"] = round(100 * float(unedited.ns.mean()), 1)
        out["rome"] = {int(l): {k: round(100 * float(g[k].mean()), 1) for k in ("es", "ps", "ns")}
                       | {"seconds_per_edit": round(float(g.seconds.iloc[0]), 2)} for l, g in edits.groupby("layer")}
        _, out["hase"] = trace_vs_edit(lm, recs, edits, "mlp", 1, progress=False)
        save()
    layers = list(range(1, max(1, L // 3) + 1))
    together = make_requests(world, n_memit, seed=0, exclude_edited=True)
    keep = world_facts_outside(world, together)
    out["memit_layers"] = layers
    if "memit_unedited" not in out:
        out["memit_unedited"] = {k: round(float(v), 1) for k, v in summarize(
            {"u": batch_scores(lm, together, keep)}).iloc[0][["ns", "unedited_acc"]].items()}
    # the paper's lambda, a third of it, and GPT-J's lambda per MLP unit (15000 x d_mlp / 16384: the update's
    # strength on a typical key is k^T (lambda C)^-1 k ~ d_mlp / lambda, so lambda scales with d_mlp)
    for key, lam in (("memit_lambda15000", 15000.0), ("memit_lambda5000", 5000.0),
                     ("memit_lambda_scaled", round(15000.0 * d_mlp / 16384, 1))):
        if key in out:
            continue
        t0 = time.perf_counter()
        df = many_edits(lm, together, "memit", layers, {l: C(l) for l in layers},
                        EditConfig.memit(mom2_update_weight=lam), keep, progress=False)
        row = summarize({"m": df}).iloc[0]
        out[key] = {k: round(float(row[k]), 1) for k in ("es", "ps", "ns", "unedited_acc")} | {
            "lambda": lam, "clamp": 0.75, "target_nll_end": round(float(df.nll_end.mean()), 3),
            "seconds_per_edit": round((time.perf_counter() - t0) / n_memit, 3)}
        save()
    return out


def markdown(results: dict) -> str:
    """The design table (what the README shows) from the results file."""
    rows = ["| design | train s (steps) | recall train / held-out | MLP effect at the last subject token, window 1 "
            "(peak) | window 2 peak | ROME ES / PS / NS per layer (unedited NS) | best ROME layer by tracing = best "
            "by editing (r) | MEMIT ES / PS / NS: lambda 15000, 5000, scaled (lambda) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, d in results["designs"].items():
        if "trace_mlp_w1" not in d:
            continue
        rome = ("; ".join(f"L{l} {v['es']:.0f}/{v['ps']:.0f}/{v['ns']:.0f}" for l, v in d["rome"].items())
                + f" ({d['rome_unedited_ns']:.0f})") if "rome" in d else "not run: " + d.get("stopped", "stopped")
        memit = "; ".join(f"{d[k]['es']:.0f}/{d[k]['ps']:.0f}/{d[k]['ns']:.0f}" for k in
                          ("memit_lambda15000", "memit_lambda5000", "memit_lambda_scaled") if k in d) or "-"
        lam = d.get("memit_lambda_scaled", {}).get("lambda")
        h = d.get("hase")
        rows.append(f"| {name} | {d['train_seconds']:.0f} ({d['steps']}) | {d['recall_train']:.2f} / "
                    f"{d['recall_heldout']:.2f} | {' '.join(f'{x:.3f}' for x in d['trace_mlp_w1'])} "
                    f"(L{d['trace_mlp_w1_peak']}; total {d['trace_mlp_w1_te']:.2f}) | L{d['trace_mlp_w2_peak']} | "
                    f"{rome} | " + (f"{h['agree']:.0%} ({h['pearson_all']:.2f})" if h else "-") + f" | {memit}"
                    + (f" ({lam})" if lam else "") + " |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--designs", default=",".join(DESIGNS))
    ap.add_argument("--work", default="runs/lm_testbed")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the design table from the results file and stop")
    a = ap.parse_args()
    if a.table:
        print(markdown(json.loads(RESULTS.read_text())))
        return
    from memloc.results import write_json

    torch.set_num_threads(a.threads)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"designs": {}}
    for name in a.designs.split(","):
        entry = {} if a.redo else results["designs"].get(name, {})
        w, t, why = DESIGNS[name]
        entry["why"], entry["world"], entry["testbed"] = why, w, t
        results["designs"][name] = entry

        def save():
            results["machine"] = f"{a.threads} torch threads, CPU"
            write_json(results, RESULTS)

        t0 = time.perf_counter()
        evaluate(name, w, t, Path(a.work), entry, save)
        entry.setdefault("eval_seconds", round(time.perf_counter() - t0, 1))
        save()
        print(json.dumps(entry, default=float))


if __name__ == "__main__":
    main()
