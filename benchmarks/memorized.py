"""Memorized-sequence scan (k-extractable, Carlini et al. 2023): batched vs one text at a time, in one run.

A 4-layer transformer (d_model 256, TransformerLens ``boot_native``, vocabulary of 2,000 words) is trained briefly
on 64 random 72-word texts repeated 4 times each, so they become extractable; the scan covers those 64 and 192
texts of the same format it never saw (k = 32 prefix tokens, n = 32 continuation tokens). The batched scan
decides exact matches with one teacher-forced pass per batch and decodes only the misses (from their first miss);
the loop decodes every continuation of every text, one text at a time. Both must give the same table.

    python benchmarks/memorized.py [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/memorized.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from memloc.analyses.lm import memorized_sequences
    from memloc.data.facts import WordTokenizer
    from memloc.models.lm import LM
    from memloc.models.transformer import _train_epoch, build_tiny_transformer, tiny_transformer_config

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(2000)]
    texts = [" ".join(rng.choice(words, 72)) for _ in range(256)]
    seen = texts[:64]  # the other 192 are never trained on
    tok = WordTokenizer(words)
    model = build_tiny_transformer(tiny_transformer_config(len(tok), 4, 256, 4, 1024, 80), seed=0)
    tokens, lengths = tok.batch(seen * 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for epoch in range(1, 31):
        _train_epoch(model, opt, tokens, lengths, 32, 0, epoch)
    train_s = time.perf_counter() - t0
    lm = LM(model.eval(), tok)
    res = {"threads": a.threads, "setting": "4 layers, d_model 256, 2000-word vocabulary; 64 texts seen 4x for 30 "
           "epochs + 192 unseen; k = 32, n = 32", "train_s": round(train_s, 1)}
    for method in ("batched", "loop"):
        memorized_sequences(lm, texts[:4], 32, 32, method=method)  # warm-up
        t0 = time.perf_counter()
        df = memorized_sequences(lm, texts, 32, 32, method=method)
        res[f"{method}_s"] = round(time.perf_counter() - t0, 2)
        res[f"{method}_table"] = df
    b, lp = res.pop("batched_table"), res.pop("loop_table")
    res["same_table"] = bool(b.generated.tolist() == lp.generated.tolist() and
                             np.allclose(b.loss, lp.loss, atol=1e-5))
    res["extractable_seen"] = float(b.extractable[:64].mean())
    res["extractable_unseen"] = float(b.extractable[64:].mean())
    res["speedup"] = round(res["loop_s"] / res["batched_s"], 1)
    print(json.dumps(res, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
