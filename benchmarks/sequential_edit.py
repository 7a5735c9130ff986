"""Sequential editing at scale on the GPT-2 testbed: ROME, r-ROME, MEMIT and AlphaEdit, N edits one after another
(ROME, r-ROME) or in batches of 100 (MEMIT, AlphaEdit), evaluated every ``every`` edits
(:func:`memloc.edit.sequential.sequential_edits`).

The testbed is the default GPT-2 design trained for 400 steps on a 300-person world (1,500 facts; 20% of the people are never edited, so
1,200 facts can be rewritten and 300 are the preserved facts). Settings: ROME and r-ROME at the testbed's ROME layer
with kmeng01/rome's 20 generated prefixes (r-ROME differs only in its keys); MEMIT and AlphaEdit at the testbed's
MEMIT layers with MEMIT's 5 generated prefixes, clamp 0.75, MEMIT's lambda per MLP unit
(``memloc.models.gpt2.GPT2_MEMIT``), AlphaEdit's null-space threshold ``--threshold`` and L2 10.

Reported: the checkpoint table per method (efficacy / paraphrase of all edits so far, neighbourhood, specificity of
the preserved facts against the unedited model, fluency, consistency, ``|W - W0| / |W0|``, collapsed edits); time per
edit over the first 100 edits and over edits 900-1000 (where reached); the memory of the key statistics (C per layer;
AlphaEdit's projector and earlier keys). Results: ``benchmarks/results/sequential_edit.json``; each method resumes
from its folder under ``--work``.

    python benchmarks/sequential_edit.py [--threads 2] [--methods memit,alphaedit,rome,r-rome] [--n 1000]
        [--rome-n 200] [--until K] [--work runs/sequential_edit] [--table] [--retime] [--take]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results" / "sequential_edit.json"
TAKE = {"clamp_norm_factor": 4.0, "v_steps": 50}
"""With ``--take`` (and the bare prompt as the only template): where one batch of 100 edits takes (48% of 100)."""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="memit,alphaedit,rome,r-rome")
    ap.add_argument("--n", type=int, default=1000, help="edits for MEMIT and AlphaEdit")
    ap.add_argument("--rome-n", type=int, default=200, help="edits for ROME and r-ROME (one at a time: slower)")
    ap.add_argument("--threshold", type=float, default=2e-2)
    ap.add_argument("--people", type=int, default=300)
    ap.add_argument("--steps", type=int, default=400, help="testbed training steps (400: ROME takes 95-100%% at "
                                                           "layers 0-2)")
    ap.add_argument("--until", type=int, default=None, help="stop each method at this many edits (resume later)")
    ap.add_argument("--work", default="runs/sequential_edit")
    ap.add_argument("--table", action="store_true", help="print the table from the results file and stop")
    ap.add_argument("--take", action="store_true",
                    help="MEMIT and AlphaEdit with the settings under which batch edits take on this testbed "
                         "(benchmarks/memit_settings.py: the bare prompt instead of generated prefixes, clamp 4, 50 "
                         "value steps); folders and result keys METHOD-take")
    ap.add_argument("--retime", action="store_true",
                    help="for each method whose folder holds its last state: time one more batch (the last batch's "
                         "requests again, result discarded) on the model after all its edits, nothing else running; "
                         "recorded as seconds_per_edit_at_end_alone")
    a = ap.parse_args()
    if a.table:
        print(markdown(json.loads(RESULTS.read_text())))
        return
    torch.set_num_threads(a.threads)
    from memloc.data.bios import make_bio_world
    from memloc.edit.rome import EditConfig, key_second_moment
    from memloc.edit.sequential import reference_templates, sequential_edits, sequential_requests
    from memloc.results import write_json
    from memloc.models.gpt2 import EDIT_LAYERS, GPT2_MEMIT, train_gpt2

    work = Path(a.work)
    world = make_bio_world(n_people=a.people)
    run = train_gpt2(world, work / "testbed", steps=a.steps, progress=True)
    lm = run.lm()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.update({"testbed": {k: run.summary[k] for k in ("n_layers", "d_model", "d_mlp", "steps", "split_names",
                                                            "fact_recall_train_templates", "seconds")
                                if k in run.summary} | {"people": a.people},
                    "machine": f"{a.threads} torch threads, CPU"})
    results.setdefault("methods", {})
    text = world.training_text()
    C = {}
    for m in a.methods.split(","):
        single = m in ("rome", "r-rome")
        n = a.rome_n if single else a.n
        records, preserved = sequential_requests(world, n, seed=0)
        layers = [EDIT_LAYERS["rome"]] if single else list(EDIT_LAYERS["memit"])
        for l in layers:
            if l not in C:
                C[l] = key_second_moment(lm, text, l)
        templates = reference_templates(lm, m, seed=0)
        cfg = (EditConfig(context_templates=templates) if single
               else EditConfig.memit(**GPT2_MEMIT, context_templates=templates))
        key = m
        if a.take and not single:
            key = f"{m}-take"
            cfg = EditConfig.memit(**{**GPT2_MEMIT, **TAKE}, context_templates=("{}",))
        if a.retime:
            entry = results["methods"].get(key)
            if entry is None:
                print(f"{m}: no results to retime")
                continue
            entry.update(retime(lm, m, records, layers, C, cfg, a.threshold, work / key, entry))
            write_json(results, RESULTS)
            print(m, {k: entry[k] for k in ("seconds_per_edit_first_100", "seconds_per_edit_900_1000",
                                            "seconds_per_edit_at_end_alone", "retimed_at")})
            continue
        t0 = time.perf_counter()
        table = sequential_edits(lm, records, m, batch=None, every=50 if single else 100, layers=layers,
                                 C={l: C[l] for l in layers}, config=cfg, preserved=preserved,
                                 threshold=a.threshold, out=work / key, until=a.until, progress=True)
        edits = table.attrs["edits"]
        st = table.attrs["settings"]
        c_bytes = sum(C[l].numel() * C[l].element_size() for l in layers)
        entry = {"n": n, "done": len(edits), "layers": layers, "batch": st["batch"], "templates": len(cfg.context_templates),
                 "checkpoints": json.loads(table.to_json(orient="records")),
                 "seconds_per_edit_first_100": round(float(edits.seconds.iloc[:100].mean()), 3),
                 "seconds_per_edit_900_1000": (round(float(edits.seconds.iloc[900:1000].mean()), 3)
                                               if len(edits) >= 1000 else None),
                 "collapsed": int((edits.flag == "collapse").sum()), "took_right_after": float(edits.took.mean()),
                 "key_statistics_bytes": c_bytes + int(st.get("key_statistics_bytes", 0)),
                 "wall_seconds_this_call": round(time.perf_counter() - t0, 1)}
        if m == "alphaedit":
            entry["nullspace_dims"] = st.get("nullspace_dims")
            entry["threshold"] = a.threshold
            entry["C_eigenvalues_quantiles"] = {str(l): [float(x) for x in np.quantile(
                torch.linalg.eigvalsh(C[l]).numpy(), [0.0, 0.25, 0.5, 0.75, 1.0])] for l in layers}
        if m == "memit":
            entry["lambda"] = cfg.mom2_update_weight
        entry["config"] = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "context_templates"}
        results["methods"][key] = entry
        write_json(results, RESULTS)
        print(key, json.dumps({k: v for k, v in entry.items() if k != "checkpoints"}, default=float))
    print(markdown(results))


def retime(lm, method, records, layers, C, cfg, threshold, folder, entry) -> dict:
    """One more batch on the model after all of ``method``'s edits in ``folder`` (state file and, for AlphaEdit,
    the earlier edits' keys restored as the harness resumes), timed alone: the last batch's requests again."""
    from safetensors.torch import load_file

    from memloc.edit.rome import alphaedit, memit, mlp_out_weight, null_space, rome
    from memloc.results import read_json

    prog = read_json(folder / "progress.json")
    t = load_file(str(folder / prog["state"]))
    done, batch = int(prog["done"]), int(entry["batch"])
    params = dict(lm.model.named_parameters())
    names = [mlp_out_weight(lm.model, l)[0] for l in layers]
    W0 = {nm: params[nm].detach().clone() for nm in names}
    space = null_space({l: C[l] for l in layers}, threshold) if method == "alphaedit" else None
    if space is not None:
        for l in space.previous:
            space.previous[l] = t[f"previous.{l}"].double()
        space.n_previous = int(prog.get("n_previous", 0))
    reqs = [r.request() for r in records[done - batch:done]]
    try:
        with torch.no_grad():
            for nm in names:
                params[nm].copy_(W0[nm] + t[f"delta.{nm}"].to(W0[nm].dtype))
        t0 = time.perf_counter()
        if method in ("rome", "r-rome"):
            rome(lm, reqs[0], layers[0], C.get(layers[0]), cfg, outcomes=False)
        elif method == "memit":
            memit(lm, reqs, layers, {l: C[l] for l in layers}, cfg, outcomes=False)
        else:
            alphaedit(lm, reqs, layers, space, cfg, outcomes=False)
        secs = time.perf_counter() - t0
    finally:
        with torch.no_grad():
            for nm in names:
                params[nm].copy_(W0[nm])
    return {"seconds_per_edit_at_end_alone": round(secs / len(reqs), 3), "retimed_at": done}


def markdown(results: dict) -> str:
    rows = ["| method | N | ES | PS | NS | specificity vs unedited | fluency | consistency | |W-W0|/|W0| | collapsed | "
            "s / edit (first 100; 900-1000) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, e in results.get("methods", {}).items():
        for c in e["checkpoints"]:
            if c["n_edits"] not in (10, 25, 50, 100, 200, 300, 500, 1000) and c["n_edits"] != e["done"]:
                continue
            rows.append(f"| {m} | {c['n_edits']} | {c['es']:.1f} | {c['ps']:.1f} | {c['ns']:.1f} | "
                        f"{c.get('specificity', float('nan')):.1f} | {c.get('fluency', float('nan')):.0f} | "
                        f"{c.get('consistency', float('nan')):.1f} | {c['update_rel']:.3f} | {c['collapsed']} | "
                        f"{e['seconds_per_edit_first_100']}; {e['seconds_per_edit_900_1000']}"
                        + (f"; {e['seconds_per_edit_at_end_alone']} at {e['retimed_at']} alone"
                           if e.get("seconds_per_edit_at_end_alone") is not None else "") + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
