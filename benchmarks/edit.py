"""Editing and knowledge-neuron attribution on the default language-model testbed, batched vs one prompt at a time.

- **Knowledge neurons**: integrated gradients (20 steps) of 96 fact prompts at every layer, with 32 prompts per
  captum call (memloc's default) against one prompt per call; the attributions must agree.
- **ROME**: one edit with 11 context templates (the bare prompt and 10 two-word prefixes, like the original's
  generated prefixes) plus the KL prompt: memloc's value optimisation runs all 12 prompts in one forward/backward
  per step; the reference loops over them, one forward/backward per prompt per step (the same loss); v* must agree.
  Also the time per edit with the testbed's single template, and the key statistics.
- **MEMIT vs sequential ROME**: time per edit for 100 edits.

    python benchmarks/edit.py [--threads 2] [--run runs/lm]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def loop_value(lm, req, layer, cfg):
    """The reference ROME value optimisation: the same loss as memloc's, one prompt per forward pass."""
    from memloc.edit.rome import VALUE, subject_last_index
    from memloc.hooks import hooks

    model = lm.model
    tgt = lm.target_ids(req.target_new, req.text)
    rewrite = [c.format(req.prompt) for c in cfg.context_templates]
    delta = torch.zeros(model.cfg.d_model, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    h, kl_init = None, {}
    for p in model.parameters():
        p.requires_grad_(False)
    for step in range(cfg.v_steps):
        opt.zero_grad()
        total = 0.0
        prompts = [(p, True) for p in rewrite] + [(p, False) for p in cfg.kl_prompts]
        for j, (p, is_rewrite) in enumerate(prompts):
            ids = lm.encode(p.format(req.subject))
            look = subject_last_index(lm, p, req.subject)
            seq = ids + (tgt[:-1] if is_rewrite else [])
            got = {}

            def add(out, look=look):
                got.setdefault("h", out[0, look].detach().clone())
                out = out.clone()
                out[0, look] = out[0, look] + delta
                return out
            with hooks(model, {VALUE.format(layer): add}):
                lp = torch.log_softmax(model(torch.tensor([seq])).float(), -1)[0]
            if h is None:
                h = got["h"]
            if is_rewrite:
                pos = torch.arange(len(ids) - 1, len(ids) - 1 + len(tgt))
                total = total + (-lp[pos, torch.tensor(tgt)].mean()) / len(rewrite)
            else:
                cur = lp[look][None]
                kl_init.setdefault(j, cur.detach().clone())
                total = total + cfg.kl_factor * F.kl_div(kl_init[j], cur, log_target=True,
                                                         reduction="batchmean") / len(cfg.kl_prompts)
        loss = total + cfg.v_weight_decay * delta.norm() / h.norm() ** 2
        if loss.item() < cfg.early_stop or step == cfg.v_steps - 1:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            if delta.norm() > cfg.clamp_norm_factor * h.norm():
                delta.mul_(cfg.clamp_norm_factor * h.norm() / delta.norm())
    for p in model.parameters():
        p.requires_grad_(True)
    return (h + delta.detach()).double()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run", default="runs/lm")
    ap.add_argument("--out", default="benchmarks/results/edit.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from memloc.data.facts import make_fact_world
    from memloc.edit.evaluate import make_requests, many_edits
    from memloc.edit.rome import EditConfig, _optimize_target, key_second_moment, rome, VALUE
    from memloc.locate.knowledge import attribute
    from memloc.models.transformer import train_lm

    run = train_lm(make_fact_world(), a.run)  # reuses a finished testbed
    lm, world = run.lm(), run.world
    model = lm.model
    res = {"setting": f"default LM testbed ({run.config['model']['n_layers']} layers, d_model "
                      f"{run.config['model']['d_model']}, d_mlp {run.config['model']['d_mlp']}), {a.run}",
           "threads": a.threads}

    # knowledge-neuron attribution
    facts = world.facts[:24]
    prompts = [p for f in facts for p in world.prompts(f)]
    toks, lens = lm.batch(prompts)
    targets = [lm.target_ids(f.object, p)[0] for f in facts for p in world.prompts(f)]
    L = model.cfg.n_layers
    attribute(model, toks[:4], lens[:4], targets[:4], 0)  # warm-up
    t0 = time.perf_counter()
    batched = [attribute(model, toks, lens, targets, l, batch_size=32)[0] for l in range(L)]
    tb = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = [attribute(model, toks, lens, targets, l, batch_size=1)[0] for l in range(L)]
    ts = time.perf_counter() - t0
    res["knowledge_neurons"] = {
        "prompts": len(prompts), "layers": L, "steps": 20,
        "batched_ms_per_prompt_layer": round(1000 * tb / len(prompts) / L, 2),
        "one_prompt_ms_per_prompt_layer": round(1000 * ts / len(prompts) / L, 2), "speedup": round(ts / tb, 1),
        "max_abs_difference": max(float((b - s).abs().max()) for b, s in zip(batched, single))}

    # ROME value optimisation: 12 prompts batched vs looped
    rec, = make_requests(world, 1, seed=0)
    req = rec.request()
    prefixes = [" ".join(world.training_text()[i].split()[:2]) + " {}" for i in range(0, 1000, 100)]
    cfg = EditConfig(context_templates=("{}", *prefixes))
    _optimize_target(lm, req, VALUE.format(0), EditConfig(v_steps=2))  # warm-up
    t0 = time.perf_counter()
    v_b, _ = _optimize_target(lm, req, VALUE.format(0), cfg)
    tvb = time.perf_counter() - t0
    t0 = time.perf_counter()
    v_l = loop_value(lm, req, 0, cfg)
    tvl = time.perf_counter() - t0
    t0 = time.perf_counter()
    C = key_second_moment(lm, world.training_text(), 0)
    tc = time.perf_counter() - t0
    pairs = make_requests(world, 100, seed=0)
    t0 = time.perf_counter()
    for r in pairs[:20]:
        rome(lm, r.request(), 0, C, outcomes=False)
    tr = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for r in pairs[:20]:
        rome(lm, r.request(), 0, C)
    tro = (time.perf_counter() - t0) / 20
    res["rome"] = {"value_optimisation_prompts": len(cfg.context_templates) + len(cfg.kl_prompts),
                   "batched_s": round(tvb, 3), "one_prompt_at_a_time_s": round(tvl, 3),
                   "speedup": round(tvl / tvb, 1),
                   "v_star_rel_difference": float((v_b - v_l).norm() / v_l.norm()),
                   "s_per_edit_testbed_template": round(tr, 3),
                   "s_per_edit_with_outcomes": round(tro, 3),
                   "key_statistics_s": round(tc, 2), "key_statistics_tokens": C.count}

    # MEMIT (one batch) vs sequential ROME, 100 edits
    from memloc.edit.evaluate import TESTBED_MEMIT
    t0 = time.perf_counter()
    many_edits(lm, pairs, "memit", [0], {0: C}, EditConfig.memit(**TESTBED_MEMIT), progress=False)
    tm = time.perf_counter() - t0
    t0 = time.perf_counter()
    many_edits(lm, pairs, "sequential", [0], {0: C}, progress=False)
    tsq = time.perf_counter() - t0
    res["memit_vs_sequential_rome"] = {"edits": len(pairs), "memit_s_per_edit": round(tm / len(pairs), 3),
                                       "sequential_rome_s_per_edit": round(tsq / len(pairs), 3),
                                       "ratio": round(tsq / tm, 2), "note": "both include scoring the edits once"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
