"""Which MEMIT settings make batch edits take on the GPT-2 testbed? One batch of 100 requests of distinct subjects
(the first 100 distinct subjects of ``sequential_requests(world, 1000)`` on the 300-person world, the testbed of
``benchmarks/sequential_edit.py``), MEMIT at the testbed's MEMIT layers with C from the training text, and per
setting: the share of requests whose new target greedy decoding reproduces (``took``), the mean target NLL per token
after the edit, the NLL the value optimisation reached (``nll_end``) and how much of the target residual the update
realises (``target_rel_error``: mean over requests of ``|z - h_after| / |z|``, z the target hidden state at the last
edit layer, h_after the state there after the update; 0 = every target reached).

Settings: the paper's (clamp 0.75, 20 steps, MEMIT's 5 generated prefixes, GPT-J's lambda per MLP unit 469), no
prefixes (the bare prompt, as the testbed's texts never put text before a name), clamp 4 (ROME's), 50 value steps,
and lambda 100 / 2,000. Results: ``benchmarks/results/memit_settings.json``.

    python benchmarks/memit_settings.py [--threads 2] [--work runs/sequential_edit]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "memit_settings.json"
GRID = [{}, {"prefixes": "none"}, {"clamp_norm_factor": 4.0, "v_steps": 50, "prefixes": "none"},
        {"clamp_norm_factor": 4.0, "v_steps": 50}, {"clamp_norm_factor": 4.0, "v_steps": 50, "mom2_update_weight": 2000.0},
        {"clamp_norm_factor": 4.0, "v_steps": 50, "mom2_update_weight": 100.0}]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="runs/sequential_edit")
    ap.add_argument("--n", type=int, default=100)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from memloc.data.bios import make_bio_world
    from memloc.edit.rome import EditConfig, key_second_moment, memit
    from memloc.edit.sequential import reference_templates, sequential_requests
    from memloc.models.gpt2 import EDIT_LAYERS, GPT2_MEMIT, train_gpt2
    from memloc.results import write_json

    world = make_bio_world(n_people=300)
    lm = train_gpt2(world, Path(a.work) / "testbed", steps=400, progress=False).lm()
    records, _ = sequential_requests(world, 1000, seed=0)
    seen, reqs = set(), []
    for r in records:
        if r.subject not in seen:
            seen.add(r.subject)
            reqs.append(r.request())
    reqs = reqs[:a.n]
    layers = list(EDIT_LAYERS["memit"])
    C = {l: key_second_moment(lm, world.training_text(), l) for l in layers}
    generated = reference_templates(lm, "memit", seed=0)
    rows = []
    for spec in GRID:
        kw = dict(spec)
        prefixes = kw.pop("prefixes", "generated")
        cfg = EditConfig.memit(**{**GPT2_MEMIT, **kw}, context_templates=generated if prefixes == "generated" else ("{}",))
        t0 = time.perf_counter()
        e = memit(lm, reqs, layers, C, cfg)
        row = {"prefixes": prefixes, "clamp": cfg.clamp_norm_factor, "v_steps": cfg.v_steps,
               "lambda": cfg.mom2_update_weight,
               "took": sum(x["took"] for x in e.info["edits"]) / len(reqs),
               "nll_after": sum(x["nll_after"] for x in e.info["edits"]) / len(reqs),
               "nll_end": e.info["nll_end"], "target_rel_error": e.info["target_rel_error"],
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(row, flush=True)
    write_json({"machine": f"{a.threads} torch threads, CPU", "n_requests": len(reqs), "layers": layers,
                "rows": rows}, RESULTS)


if __name__ == "__main__":
    main()
