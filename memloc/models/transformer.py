"""A tiny transformer built with TransformerLens 4's ``TransformerBridge.boot_native``, trained on a fact world.

``train_lm(world, out)`` trains a small GPT-style model (default 4 layers, d_model 128, 4 heads, d_mlp 512, GELU,
LayerNorm) on the world's training text until it recalls the facts, and writes a folder: ``config.json``,
``world.json``, ``tokenizer.json``, ``model.safetensors``, ``summary.json``. ``LMRun(out).model()`` boots the same
architecture and loads the weights, in eval mode (``boot_native`` itself returns a model in training mode).
Any other ``TransformerBridge`` (e.g. ``TransformerBridge.boot_transformers("gpt2", hf_model=...)`` from a local
Hugging Face cache) works with memloc's analyses as long as a tokenizer maps its words to ids.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.facts import FactWorld, WordTokenizer
from ..results import atomic_path, read_json, write_json

__all__ = ["tiny_transformer_config", "build_tiny_transformer", "train_lm", "LMRun", "lm_loss"]


def tiny_transformer_config(vocab_size: int, n_layers: int = 4, d_model: int = 128, n_heads: int = 4,
                            d_mlp: int = 512, n_ctx: int = 16) -> dict:
    return {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads, "d_head": d_model // n_heads,
            "d_mlp": d_mlp, "d_vocab": vocab_size, "n_ctx": n_ctx, "act_fn": "gelu", "normalization_type": "LN"}


def build_tiny_transformer(config: dict, seed: int = 0):
    """Boot a native TransformerBridge from ``config`` with weights seeded by ``seed`` (global RNG restored)."""
    import transformer_lens.model_bridge.sources.native  # noqa: F401  (attaches boot_native)
    from transformer_lens.model_bridge import TransformerBridge

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransformerBridge.boot_native(dict(config))


def lm_loss(model, tokens: torch.Tensor, lengths: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of right-padded ``tokens [B, T]`` whose real lengths are ``lengths [B]`` (the
    padding is masked by position, never by token id); ``reduction="none"`` gives ``[B]`` sums."""
    logits = model(tokens)
    tgt = tokens[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
    real = torch.arange(tgt.shape[1], device=tgt.device)[None] < (torch.as_tensor(lengths, device=tgt.device)[:, None] - 1)
    ce = ce.view_as(tgt) * real
    if reduction == "none":
        return ce.sum(1)
    return ce.sum() / real.sum()


class LMRun:
    """A trained language-model folder (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if (self.path / "testbed.json").exists():  # the GPT-2 testbed (memloc.models.gpt2): a Hugging Face folder
            self.kind = "gpt2"
            self.config = read_json(self.path / "testbed.json")
            if not (self.path / "config.json").exists():
                raise FileNotFoundError(f"{self.path} is an unfinished GPT-2 testbed (no config.json); rerun "
                                        "`memloc lm train` into it.")
            import transformers
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        else:
            if not (self.path / "config.json").exists():
                raise FileNotFoundError(f"{self.path} is not a memloc language-model run (no config.json).")
            self.kind = "word"
            self.config = read_json(self.path / "config.json")
            self.tokenizer = WordTokenizer.load(self.path / "tokenizer.json")
        self.world = FactWorld.from_json(read_json(self.path / "world.json"))

    @property
    def summary(self) -> dict | None:
        p = self.path / "summary.json"
        return read_json(p) if p.exists() else None

    def model(self, device: str | torch.device = "cpu"):
        if self.kind == "gpt2":
            return self.lm(device=device).model
        from safetensors.torch import load_file

        from ..hooks import resolve_device

        model = build_tiny_transformer(self.config["model"], seed=self.config["seed"])
        model.load_state_dict(load_file(str(self.path / "model.safetensors")))
        dev = resolve_device(device)
        if dev.type != "cpu":  # the bridge prints on every move; it is built on the CPU
            model = model.to(dev)
        return model.eval()

    def lm(self, prepend_bos: bool | None = None, device: str | torch.device = "cpu"):
        """The run's model and word tokenizer as an :class:`~memloc.models.lm.LM` handle (``<bos>`` first, as
        the testbed was trained)."""
        from .lm import LM

        if self.kind == "gpt2":
            c = self.config
            lm = LM.from_pretrained(self.path, prepend_bos=prepend_bos, device=device)
            lm.name = f"memloc GPT-2 testbed {self.path} ({c['n_layers']} layers, d_model {c['d_model']})"
            return lm
        m = self.config["model"]
        return LM(self.model(device), self.tokenizer, prepend_bos,
                  name=f"memloc word testbed {self.path} ({m['n_layers']} layers, d_model {m['d_model']})")


def _save_model(model, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def _train_epoch(model, opt, tokens: torch.Tensor, lengths: torch.Tensor, batch_size: int, seed: int, epoch: int):
    """One epoch over right-padded ``tokens`` (real ``lengths``) in an order seeded by ``(seed, epoch)``; returns
    the last batch's loss."""
    model.train()
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    loss = None
    for b in range(math.ceil(len(tokens) / batch_size)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        loss = lm_loss(model, tokens[idx], lengths[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss


def train_lm(world: FactWorld, out: str | Path, *, n_layers: int = 4, d_model: int = 128, n_heads: int = 4,
             d_mlp: int = 512, epochs: int = 300, lr: float = 1e-3, weight_decay: float = 0.01, batch_size: int = 64,
             target_recall: float = 1.0, min_epochs: int = 0, seed: int = 0, progress: bool = True, overwrite: bool = False,
             allow: tuple[str, ...] = ()) -> LMRun:
    """Train a tiny transformer on ``world.training_text()`` until it recalls every fact from its training
    prompts (top-1 object, ``target_recall``) and every canary repeated more than once (and at least
    ``min_epochs`` have run), or ``epochs`` run out.

    AdamW, constant learning rate, data order seeded by ``(seed, epoch)``. A finished run in ``out`` with the same
    world and settings is returned as is; one with other settings is refused unless ``overwrite`` (which retrains);
    a non-empty folder that is not a word-testbed run (files other than ``allow``) is never written into.
    """
    from ..analyses.lm import canary_extraction, fact_recall
    from .lm import LM

    import json
    import shutil

    from ..validate import ConfigError, OutputExistsError

    out = Path(out)
    if d_model % n_heads or d_model // n_heads < 2 or n_layers < 1 or d_mlp < 1:
        raise ConfigError(f"The 'd_model' parameter must be a multiple of n_heads ({n_heads}) with heads at least 2 "
                          f"wide, and n_layers, d_mlp >= 1. Got d_model {d_model!r}, n_layers {n_layers!r}, d_mlp "
                          f"{d_mlp!r} instead.")
    tok = WordTokenizer(world.words())
    text = world.training_text()
    tokens, lengths = tok.batch(text)
    n_ctx = max(16, int(lengths.max()))
    cfg = tiny_transformer_config(len(tok), n_layers, d_model, n_heads, d_mlp, n_ctx)
    settings = {"model": cfg, "seed": seed, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
                "max_epochs": epochs, "min_epochs": min_epochs, "target_recall": target_recall, "n_sentences": len(text)}
    if out.exists() and any(p.name not in allow for p in out.iterdir()):
        ours = {"config.json", "world.json", "tokenizer.json"}
        if not ((out / "config.json").exists() and (out / "world.json").exists()) or (out / "testbed.json").exists():
            raise OutputExistsError(f"{out} exists and is not a memloc word-testbed run; give a new folder for --out.")
        same = (read_json(out / "config.json") == json.loads(json.dumps(settings))
                and read_json(out / "world.json") == json.loads(json.dumps(world.to_json())))
        if not same and not overwrite:
            raise OutputExistsError(f"{out} holds a language-model run trained with other settings or another world; "
                                    "use another folder, or --overwrite to retrain.")
        if same and (out / "summary.json").exists() and not overwrite:
            return LMRun(out)
        for p in out.iterdir():
            if p.name in ours | {"summary.json", "model.safetensors"} or p.name == "unlearn":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json(world.to_json(), out / "world.json")
    tok.save(out / "tokenizer.json")
    write_json(settings, out / "config.json")
    model = build_tiny_transformer(cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    t0 = time.perf_counter()
    bar = tqdm(range(1, epochs + 1), desc="train LM", disable=not progress, unit="ep")
    recall = canaries = None
    epoch = 0
    for epoch in bar:
        loss = _train_epoch(model, opt, tokens, lengths, batch_size, seed, epoch)
        if epoch % 5 == 0 or epoch == epochs:
            lm = LM(model.eval(), tok)
            recall = float(fact_recall(lm, world, "train").correct.mean())
            canaries = canary_extraction(lm, world)
            repeated = canaries[canaries.repeats > 1].extracted
            bar.set_postfix(loss=f"{loss.item():.3f}", recall=f"{recall:.3f}",
                            canaries=f"{canaries.extracted.mean():.2f}")
            if recall >= target_recall and repeated.all() and epoch >= min_epochs:
                break
    model.eval()
    _save_model(model, out / "model.safetensors")
    lm = LM(model, tok)
    held = fact_recall(lm, world, "heldout")
    summary = {"epochs": epoch, "seconds": round(time.perf_counter() - t0, 1),
               "fact_recall_train_templates": float(fact_recall(lm, world, "train").correct.mean()),
               "fact_recall_heldout_templates": float(held.correct.mean()),
               "canaries_extracted": {str(r): float(g.extracted.mean()) for r, g in
                                      canary_extraction(lm, world).groupby("repeats")},
               **settings}
    write_json(summary, out / "summary.json")
    return LMRun(out)
