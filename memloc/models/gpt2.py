"""The default language testbed: a Hugging Face GPT-2 with a byte-level BPE tokenizer, both trained here on a
biography world, opened the way users open their own models (``LM.from_pretrained`` ->
``TransformerBridge.boot_transformers``).

``train_gpt2(world, out)`` trains a byte-level BPE tokenizer on ``world.training_text()`` (``<|endoftext|>`` = id 0 is
BOS = EOS = PAD, and the tokenizer's post-processor prepends it, so ``tokenizer(text)`` starts with BOS as the model
was trained), then a ``transformers.GPT2LMHeadModel`` on the same texts, each wrapped as ``BOS text EOS``. The folder
holds what ``save_pretrained`` writes (``config.json``, ``model.safetensors``, the tokenizer's files) plus memloc's
``testbed.json`` (every training setting), ``world.json`` and ``summary.json`` (recall, canaries, time). Any
Hugging Face tool opens it; memloc opens it with :class:`~memloc.models.transformer.LMRun` or
``LM.from_pretrained``.

Training: AdamW (betas 0.9 / 0.98, weight decay on matrices only), linear warm-up then cosine decay to
``final_lr`` x ``lr``, gradient clipping, batches of whole texts drawn by a seeded permutation per epoch, a fixed
number of steps. The defaults are the design chosen by ``benchmarks/lm_testbed.py`` (see
``benchmarks/results/lm_testbed.json``).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

import torch

from ..results import read_json, write_json

__all__ = ["GPT2_DEFAULTS", "EDIT_LAYERS", "train_bpe_tokenizer", "train_gpt2", "testbed_metrics", "tokenizer_texts"]

GPT2_DEFAULTS = {
    "n_layers": 6, "d_model": 128, "n_heads": 4, "d_mlp": 512, "tie_embeddings": True,
    "steps": 300, "batch_size": 64, "lr": 2e-3, "betas": (0.9, 0.98), "weight_decay": 0.01, "warmup": 50,
    "final_lr": 0.05, "clip": 1.0, "vocab_size": 2048, "split_names": True, "seed": 0,
}
"""The default testbed's settings (:func:`train_gpt2`)."""

EOT = "<|endoftext|>"


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 2048, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on ``texts`` (GPT-2's pre-tokenizer: a word and its leading space are
    one piece) as a ``transformers.PreTrainedTokenizerFast`` with ``<|endoftext|>`` (id 0) as BOS, EOS and PAD;
    ``tokenizer(text)`` prepends BOS (``add_special_tokens=False`` does not). Every digit with a leading space is one
    token (the merges are learned from the texts plus the digits 0-9), so a digit secret has one token per digit
    whichever digits the texts happen to contain, and exposure ranks all candidates in one pass over their stems."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing

    if not isinstance(vocab_size, int) or vocab_size < 257 + 1:
        raise ValueError(f"The 'vocab_size' parameter must be an int >= 258 (256 bytes, <|endoftext|> and at least "
                         f"one merge). Got {vocab_size!r} instead.")
    bpe = ByteLevelBPETokenizer()
    digits = [" " + " ".join("0123456789")] * 1000  # " 0" .. " 9" merged first: single tokens, as in GPT-2's vocabulary
    bpe.train_from_iterator(list(texts) + digits, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOT], show_progress=False)
    inner = bpe._tokenizer
    inner.post_processor = TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B",
                                              special_tokens=[(EOT, inner.token_to_id(EOT))])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, bos_token=EOT, eos_token=EOT, pad_token=EOT)
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == 0
    return tok


def _check(settings: dict) -> dict:
    from ..validate import ConfigError

    s = {**GPT2_DEFAULTS, **settings}
    unknown = set(s) - set(GPT2_DEFAULTS)
    if unknown:
        raise ConfigError(f"Unknown testbed setting(s) {sorted(unknown)}; valid settings are {sorted(GPT2_DEFAULTS)}.")
    for k in ("n_layers", "d_model", "n_heads", "d_mlp", "steps", "batch_size", "vocab_size"):
        if isinstance(s[k], bool) or not isinstance(s[k], int) or s[k] < 1:
            raise ConfigError(f"The {k!r} parameter must be an int >= 1. Got {s[k]!r} instead.")
    if s["d_model"] % s["n_heads"] or s["d_model"] // s["n_heads"] < 2:
        raise ConfigError(f"The 'd_model' parameter must be a multiple of n_heads ({s['n_heads']}) with heads at least "
                          f"2 wide. Got {s['d_model']!r} instead.")
    for k in ("lr", "weight_decay", "final_lr", "clip"):
        v = s[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (k == "lr" and v == 0):
            raise ConfigError(f"The {k!r} parameter must be a finite number {'> 0' if k == 'lr' else '>= 0'}. "
                              f"Got {v!r} instead.")
    if not isinstance(s["warmup"], int) or not 0 <= s["warmup"] < s["steps"]:
        raise ConfigError(f"The 'warmup' parameter must be an int in [0, steps). Got {s['warmup']!r} instead.")
    s["betas"] = tuple(float(b) for b in s["betas"])
    for k in ("tie_embeddings", "split_names"):
        if not isinstance(s[k], (bool, int)) or s[k] not in (0, 1):
            raise ConfigError(f"The {k!r} parameter must be True or False. Got {s[k]!r} instead.")
        s[k] = bool(s[k])
    return s


def tokenizer_texts(texts: Sequence[str], world, seed: int = 0, pool: int = 1000) -> list[str]:
    """``texts`` with every part of the world's names (people and canaries) replaced, occurrence by occurrence, by
    one of ``pool`` other made-up names: a tokenizer trained on them has sub-word pieces of such names but not the
    world's names, which it splits into pieces (about 3 per name part) as GPT-2's tokenizer splits a name it never
    saw. Texts without the names are unchanged."""
    import re

    import numpy as np

    from ..data.bios import _names

    parts = {p for name in list(world.subjects) + [c.name for c in world.canaries] for p in name.split()}
    if not parts:
        return list(texts)
    rng = np.random.default_rng(seed + 5)
    other = _names(rng, pool, set(parts))
    pat = re.compile(r"\b(" + "|".join(map(re.escape, sorted(parts, key=len, reverse=True))) + r")\b")
    return [pat.sub(lambda m: other[int(rng.integers(pool))], t) for t in texts]


def _lr_factor(step: int, s: dict) -> float:
    if step < s["warmup"]:
        return (step + 1) / s["warmup"]
    t = (step - s["warmup"]) / max(1, s["steps"] - s["warmup"])
    return s["final_lr"] + (1 - s["final_lr"]) * 0.5 * (1 + math.cos(math.pi * t))


def train_gpt2(world, out: str | Path, *, texts: Sequence[str] | None = None, tokenizer_dir: str | Path | None = None,
               progress: bool = True, overwrite: bool = False, **settings):
    """Train the testbed (see the module docstring) on ``world.training_text()`` (or ``texts``) into ``out`` and
    return its :class:`~memloc.models.transformer.LMRun`.

    ``settings`` override :data:`GPT2_DEFAULTS` (``n_layers, d_model, n_heads, d_mlp, tie_embeddings, steps,
    batch_size, lr, betas, weight_decay, warmup, final_lr, clip, vocab_size, split_names, seed``). ``split_names``
    trains the tokenizer on the texts with the names replaced (:func:`tokenizer_texts`), so names are several
    tokens, as in a pretrained model; otherwise every name part is one token. ``tokenizer_dir`` reuses a
    trained tokenizer (an unlearning oracle shares its run's token ids). A finished run with the same settings in
    ``out`` is returned as is; other settings are refused unless ``overwrite``; a folder memloc did not create is
    never written into."""
    import transformers
    from tqdm.auto import tqdm

    from .transformer import LMRun

    s = _check(settings)
    out = Path(out)
    texts = list(world.training_text() if texts is None else texts)
    if not texts:
        raise ValueError("No training texts.")
    import hashlib

    digest = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:16]
    record = {"kind": "gpt2", **s, "betas": list(s["betas"]), "n_texts": len(texts), "texts_sha1": digest,
              "tokenizer": "trained on the training texts" if tokenizer_dir is None else f"from {tokenizer_dir}"}
    _claim(out, record, overwrite)
    if (out / "summary.json").exists():
        return LMRun(out)
    if tokenizer_dir is None:
        tok = train_bpe_tokenizer(tokenizer_texts(texts, world, s["seed"]) if s["split_names"] else texts,
                                  s["vocab_size"])
    else:
        tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    seqs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    n_ctx = max(64, 1 << (max(len(q) for q in seqs) + 16 - 1).bit_length())
    gen = torch.Generator().manual_seed(s["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s["seed"])
        cfg = transformers.GPT2Config(
            vocab_size=len(tok), n_positions=n_ctx, n_embd=s["d_model"], n_layer=s["n_layers"], n_head=s["n_heads"],
            n_inner=s["d_mlp"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=s["tie_embeddings"])
        model = transformers.GPT2LMHeadModel(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "wte" not in n and "wpe" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "wte" not in n and "wpe" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=s["lr"], betas=s["betas"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, s))
    lengths = torch.tensor([len(q) for q in seqs])
    t0 = time.perf_counter()
    model.train()
    bar = tqdm(range(s["steps"]), desc="train GPT-2 testbed", disable=not progress, unit="step")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # no padding / loss-type notices: padding is right and masked by labels
    try:
        loss = _train_steps(model, opt, sched, bar, seqs, lengths, gen, tok, s)
    finally:
        transformers.logging.set_verbosity(verbosity)
    seconds = time.perf_counter() - t0
    model.eval()
    tmp = out / ".model.tmp"
    from .lm import quiet_hf
    with quiet_hf(progress):
        model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()
    write_json(world.to_json(), out / "world.json")
    run = LMRun(out)
    summary = {**run.config, "seconds": round(seconds, 1), "final_loss": float(loss.item()),
               "threads": torch.get_num_threads(), "n_params": int(sum(p.numel() for p in model.parameters())),
               "n_ctx": n_ctx, "vocab_used": len(tok)}
    summary.update(testbed_metrics(run.lm(), world))
    write_json(summary, out / "summary.json")
    return run


def _train_steps(model, opt, sched, bar, seqs, lengths, gen, tok, s):
    """The optimisation loop of :func:`train_gpt2`; returns the last batch's loss."""
    order, at, loss = torch.empty(0, dtype=torch.long), 0, None
    for step in bar:
        if at + s["batch_size"] > len(order):  # a fresh seeded permutation per epoch
            order, at = torch.randperm(len(seqs), generator=gen), 0
        idx = order[at:at + s["batch_size"]].tolist()
        at += s["batch_size"]
        T = int(lengths[idx].max())
        ids = torch.full((len(idx), T), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(idx), T), -100, dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, :len(seqs[i])] = torch.tensor(seqs[i])
            labels[j, 1:len(seqs[i])] = torch.tensor(seqs[i][1:])  # every token after BOS (EOS included)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["clip"])
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"The training loss became {loss.item()} at step {step}; lower lr ({s['lr']}).")
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss


def testbed_metrics(lm, world) -> dict:
    """Fact recall (training templates, held-out paraphrases) and canary extraction by repeat count."""
    from ..analyses.lm import canary_extraction, fact_recall

    ex = canary_extraction(lm, world)
    return {"fact_recall_train_templates": float(fact_recall(lm, world, "train").correct.mean()),
            "fact_recall_heldout_templates": float(fact_recall(lm, world, "heldout").correct.mean()),
            "canaries_extracted": {str(r): float(g.extracted.mean()) for r, g in ex.groupby("repeats")}}


def _claim(out: Path, record: dict, overwrite: bool) -> None:
    """Create ``out`` for a testbed with ``record`` as its settings, or accept it when it is this testbed's own
    folder with the same settings. Refuses a folder memloc did not create and, unless ``overwrite``, one with other
    settings (``overwrite`` clears memloc's own files only)."""
    import shutil

    from ..validate import OutputExistsError

    mine = out / "testbed.json"
    if out.exists() and any(out.iterdir()):
        if not mine.exists():
            raise OutputExistsError(f"{out} exists and is not a memloc GPT-2 testbed (no testbed.json); give a new "
                                    "folder for --out.")
        old = read_json(mine)
        if old != record:
            if not overwrite:
                diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
                raise OutputExistsError(f"{out} holds a testbed trained with other settings ({', '.join(diff)} "
                                        "differ); use another folder or --overwrite to retrain.")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not mine.exists():
        write_json(record, mine)


EDIT_LAYERS = {"rome": 1, "memit": [1, 2]}
"""Where the default testbed is edited (the investigation, ``memloc edit``): ROME's layer and MEMIT's layers, from
the design table (``benchmarks/results/lm_testbed.json``, the default design ``bios200_6x128_split_300``: ROME takes
90%, 85% and 80% of 20 edits at layers 0, 1 and 2, then fails (95%, 100%, 95% after 400 steps); layer 1 is where
causal tracing's MLP effect at the last subject token peaks)."""

GPT2_MEMIT = {"mom2_update_weight": 15000.0 * 512 / 16384}
"""MEMIT's settings on the default testbed, with ``EditConfig.memit()``'s clamp 0.75: GPT-J's lambda per MLP unit
(15,000 x d_mlp / 16,384 = 468.75 for d_mlp 512). An update realises about s / (1 + s) of the residual with
s ~ d_mlp / lambda (docs/conventions.md), so the paper's 15,000 barely moves a 512-unit MLP: ES 2% vs 25% on 100 edits
in the design table (default design; 8% vs 43% with whole-name tokens). ``EditConfig.memit()`` alone is the paper's setting."""
