"""The language-model handle: a TransformerLens model and its tokenizer, with every tokenization decision explicit.

Every language-model function in memloc takes an :class:`LM`. It holds a ``TransformerBridge`` (or any
TransformerLens-style model with ``cfg`` and hook points) and a tokenizer: a Hugging Face tokenizer (fast, for
character offsets) or memloc's :class:`~memloc.data.facts.WordTokenizer`. It owns:

- **BOS policy.** ``prepend_bos=None`` follows the tokenizer's own convention: a Hugging Face tokenizer that adds
  BOS itself (Llama) gets it, one that does not (GPT-2) does not (as in kmeng01/rome); memloc's word tokenizer
  gets ``<bos>`` (its testbed is trained so). ``True`` / ``False`` force it. :meth:`encode` never adds EOS. The
  policy is recorded in :attr:`settings`, and every result that used the handle carries it.
- **Padding with an explicit length.** :meth:`batch` right-pads with the tokenizer's pad id and returns the true
  lengths; every mask in memloc comes from those lengths, never from "id == pad id" (with GPT-2's
  BOS = EOS = PAD = 0 that would drop real tokens). Right padding needs no attention mask in a causal model:
  the outputs at real positions never see the padding.
- **Spans.** :meth:`span` gives the token positions of a substring (a multi-token subject) from character offsets.
- **Targets.** :meth:`target_ids` tokenizes a continuation as ROME does (a leading space unless the prompt ends
  in whitespace, no BOS); :meth:`score` gives teacher-forced log-probabilities of multi-token targets in batches;
  :meth:`generate` decodes greedily in batches.
"""
from __future__ import annotations

import contextlib

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["LM", "as_lm"]


class LM:
    """A language model with its tokenizer (see the module docstring).

    Args:
        model: a ``TransformerBridge`` (``TransformerBridge.boot_transformers`` / ``boot_native``) or any model with
            ``cfg`` (``n_layers``, ``d_model``, ``d_mlp``, ``n_ctx``) whose forward maps token ids ``[B, T]`` to
            logits ``[B, T, V]``.
        tokenizer: a Hugging Face tokenizer (a fast one: spans need character offsets) or a
            :class:`~memloc.data.facts.WordTokenizer`.
        prepend_bos: ``None`` (the tokenizer's convention), ``True`` or ``False``.
        name: what to call the model in settings (default: its class and size).
    """

    def __init__(self, model, tokenizer, prepend_bos: bool | None = None, name: str | None = None):
        from ..data.facts import WordTokenizer

        if model is None or not hasattr(model, "cfg"):
            raise TypeError("LM needs a TransformerLens model (TransformerBridge) with a .cfg; got "
                            f"{type(model).__name__}.")
        self.model = model
        self.tokenizer = tokenizer
        self.word = isinstance(tokenizer, WordTokenizer)
        if not self.word and not hasattr(tokenizer, "convert_ids_to_tokens"):
            raise TypeError("The tokenizer must be a Hugging Face tokenizer (transformers.PreTrainedTokenizerFast, "
                            "AutoTokenizer.from_pretrained(...)) or memloc's WordTokenizer; got "
                            f"{type(tokenizer).__name__}.")
        if self.word:
            self.bos_id, self.pad_id, self.eos_id = tokenizer.bos_id, tokenizer.pad_id, None
            convention = True
        else:
            self.bos_id = getattr(tokenizer, "bos_token_id", None)
            self.eos_id = getattr(tokenizer, "eos_token_id", None)
            pad = getattr(tokenizer, "pad_token_id", None)
            self.pad_id = int(pad if pad is not None else self.eos_id if self.eos_id is not None else 0)
            with_sp = tokenizer("memloc", add_special_tokens=True)["input_ids"]
            without = tokenizer("memloc", add_special_tokens=False)["input_ids"]
            convention = bool(self.bos_id is not None and len(with_sp) > len(without) and with_sp[0] == self.bos_id)
        self.prepend_bos = convention if prepend_bos is None else bool(prepend_bos)
        if self.prepend_bos and self.bos_id is None:
            raise ValueError("prepend_bos=True, but the tokenizer has no BOS token.")
        self.bos_rule = "tokenizer convention" if prepend_bos is None else "explicit"
        c = model.cfg
        self.name = name or f"{type(model).__name__}({c.n_layers} layers, d_model {c.d_model})"

    def __repr__(self) -> str:
        return (f"LM({self.name}, {type(self.tokenizer).__name__} with {self.vocab_size} tokens, "
                f"prepend_bos={self.prepend_bos})")

    # ------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, tokenizer_dir: str | Path | None = None,
                        prepend_bos: bool | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "LM":
        """A local Hugging Face folder (``save_pretrained``: ``config.json`` and weights; the tokenizer in the same
        folder or in ``tokenizer_dir``), booted with ``TransformerBridge.boot_transformers(hf_model=...)`` in eval
        mode. Nothing is downloaded (``local_files_only``); a folder memloc's ``lm train`` wrote (a word-level
        testbed) is opened too. The hub path is ``from_pretrained("gpt2")`` on a machine that can reach it."""
        from ..hooks import resolve_device

        dev = resolve_device(device)
        path = Path(model_dir)
        if (path / "world.json").exists() and (path / "model.safetensors").exists() and not (path / "tokenizer_config.json").exists():
            from .transformer import LMRun
            return LMRun(path).lm(prepend_bos=prepend_bos, device=dev)
        try:
            import transformers
            import transformer_lens.model_bridge.sources.transformers  # noqa: F401  (attaches boot_transformers)
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError as e:
            raise ValueError(f"Loading a Hugging Face model needs transformers and transformer-lens ({e}); install "
                             "memloc with the [lm] extra.") from None
        local = path.exists()
        if local and not (path / "config.json").exists():
            raise ValueError(f"{path} is not a Hugging Face model folder (no config.json); give the folder "
                             "save_pretrained wrote.")
        tok_src = Path(tokenizer_dir) if tokenizer_dir is not None else path
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(tok_src), local_files_only=local)
        except Exception as e:  # noqa: BLE001 - any failure: say where the tokenizer was looked for
            raise ValueError(f"No tokenizer could be loaded from {tok_src} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:160]}); pass --tokenizer / tokenizer_dir.") from None
        with quiet_hf(not local):  # a local folder loads at once: no "Loading weights" bar per call
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=local, dtype=dtype,
                                                                   attn_implementation="eager")
        arch = (getattr(hf.config, "architectures", None) or [type(hf).__name__])[0]
        model = TransformerBridge.boot_transformers(getattr(hf.config, "_name_or_path", None) or str(path),
                                                    hf_model=hf.eval(), tokenizer=tok, device=dev, dtype=dtype)
        lm = cls(model.eval(), tok, prepend_bos, name=f"{arch} from {path}")
        lm.hf_model = hf  # the Hugging Face model under the bridge (the same parameters): save_pretrained it
        return lm

    # ------------------------------------------------------------------------------------------- properties

    @property
    def device(self) -> torch.device:
        from ..hooks import model_device
        return model_device(self.model)

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def settings(self) -> dict[str, Any]:
        """What every result records about the model and its tokenization."""
        return {"model": self.name, "tokenizer": type(self.tokenizer).__name__, "vocab_size": self.vocab_size,
                "prepend_bos": self.prepend_bos, "bos_rule": self.bos_rule, "bos_id": self.bos_id,
                "pad_id": self.pad_id, "padding": "right, masks from lengths"}

    # ------------------------------------------------------------------------------------------- tokenization

    def _bos(self, bos: bool | None) -> bool:
        return self.prepend_bos if bos is None else bool(bos)

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of ``text`` (BOS by the policy unless ``bos`` says otherwise; never EOS)."""
        if self.word:
            ids = list(self.tokenizer.encode(text, bos=False))
        else:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return ([self.bos_id] if self._bos(bos) else []) + ids

    def encode_with_offsets(self, text: str, bos: bool | None = None) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's ``(start, end)`` character span in ``text`` (BOS: ``(0, 0)``)."""
        if self.word:
            spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
            ids = list(self.tokenizer.encode(text, bos=False))
        else:
            if not getattr(self.tokenizer, "is_fast", False):
                raise ValueError("Token spans need character offsets, which only fast Hugging Face tokenizers give "
                                 "(use AutoTokenizer.from_pretrained(..., use_fast=True)).")
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, spans = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        if self._bos(bos):
            return [self.bos_id] + ids, [(0, 0)] + spans
        return ids, spans

    def span(self, text: str, substring: str, start: int | None = None, bos: bool | None = None) -> list[int]:
        """Token positions (in :meth:`encode` of ``text``) covering ``substring``: its first occurrence, or the one
        at character ``start``. The subject's last token is ``span(...)[-1]``."""
        if start is None:
            start = text.find(substring)
            if start < 0:
                raise ValueError(f"{substring!r} does not occur in {text!r}.")
        elif text[start:start + len(substring)] != substring:
            raise ValueError(f"{substring!r} is not at character {start} of {text!r}.")
        end = start + len(substring)
        _, offs = self.encode_with_offsets(text, bos)
        pos = [i for i, (s, e) in enumerate(offs) if e > s and s < end and e > start]
        if not pos:
            raise ValueError(f"No token of {text!r} covers {substring!r}.")
        return pos

    def join(self, prompt: str, target: str) -> str:
        """``prompt`` followed by ``target`` as a continuation (a space between them unless one is there)."""
        if not target or prompt == "" or prompt[-1].isspace() or target[0].isspace():
            return prompt + target
        return prompt + " " + target

    def target_ids(self, target: str, prompt: str = "x") -> list[int]:
        """Token ids of ``target`` as a continuation of ``prompt`` (kmeng01/rome's convention: the target with
        a leading space, tokenized on its own, no BOS)."""
        text = self.join(prompt, target)[len(prompt):]
        ids = self.encode(text, bos=False)
        if not ids:
            raise ValueError(f"The target {target!r} encodes to no tokens.")
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.word:
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_strings(self, ids) -> list[str]:
        ids = [int(i) for i in ids]
        if self.word:
            return [self.tokenizer.vocab[i] for i in ids]
        return list(self.tokenizer.convert_ids_to_tokens(ids))

    def pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``tokens [N, T]`` and ``lengths [N]`` (on the CPU)."""
        if not len(seqs):
            raise ValueError("No sequences given.")
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        if int(lengths.min()) == 0:
            raise ValueError("An empty sequence cannot be run through the model.")
        out = torch.full((len(seqs), int(lengths.max())), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        return out, lengths

    def batch(self, texts: Sequence[str], bos: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``tokens [N, T]`` and true ``lengths [N]`` of ``texts``."""
        return self.pad([self.encode(t, bos) for t in texts])

    @staticmethod
    def mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
        """``[N, T]`` True at real tokens."""
        return torch.arange(T)[None] < torch.as_tensor(lengths)[:, None]

    # ------------------------------------------------------------------------------------------- model passes

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T, V]`` logits of right-padded ``tokens`` (moved to the model's device)."""
        return self.model(tokens.to(self.device))

    def next_token_logprobs(self, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Log-probabilities ``[N, V]`` (float64, CPU) of the token after each prompt."""
        from ..hooks import require_eval

        require_eval(self.model, "Language-model scoring")
        out = []
        with torch.no_grad():
            for s in range(0, len(prompts), batch_size):
                toks, lens = self.batch(prompts[s:s + batch_size])
                lg = self.logits(toks)
                out.append(torch.log_softmax(lg[torch.arange(len(toks)), (lens - 1).to(lg.device)].double(), -1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.vocab_size, dtype=torch.float64)

    def score(self, prompts: Sequence[str], targets: Sequence[str | Sequence[int]], batch_size: int = 128,
              return_tokens: bool = False):
        """Teacher-forced scores of each ``target`` after its ``prompt`` (targets as text, or as token ids).

        Returns a dict of ``[N]`` arrays: ``logprob`` (sum over the target's tokens), ``mean_logprob`` (per
        token: CounterFact's comparison), ``n_tokens``, ``exact`` (the model's argmax is the target token at every
        position: greedy decoding reproduces the target), ``first_rank`` (rank of the target's first token, 0 =
        top), ``token_acc`` (fraction of target tokens that are the argmax); with ``return_tokens`` also
        ``token_logprobs`` (a list of arrays).
        """
        from ..hooks import require_eval

        require_eval(self.model, "Language-model scoring")
        if len(prompts) != len(targets):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets.")
        seqs, starts, tgts = [], [], []
        for p, t in zip(prompts, targets):
            pid = self.encode(p)
            tid = list(t) if not isinstance(t, str) else self.target_ids(t, p)
            if not pid:
                raise ValueError(f"The prompt {p!r} encodes to no tokens and no BOS is prepended; nothing predicts "
                                 "the target's first token (use prepend_bos=True or a non-empty prompt).")
            seqs.append(pid + tid)
            starts.append(len(pid))
            tgts.append(tid)
        res = {k: np.zeros(len(seqs)) for k in ("logprob", "mean_logprob", "n_tokens", "token_acc", "first_rank")}
        res["exact"] = np.zeros(len(seqs), dtype=bool)
        per_tok = []
        order = np.argsort([len(s) for s in seqs], kind="stable")  # similar lengths share a batch
        with torch.no_grad():
            for b in range(0, len(seqs), batch_size):
                idx = order[b:b + batch_size]
                toks, lens = self.pad([seqs[i] for i in idx])
                lp = torch.log_softmax(self.logits(toks).double(), -1).cpu()
                for j, i in enumerate(idx):
                    pos = torch.arange(starts[i] - 1, starts[i] - 1 + len(tgts[i]))
                    t = torch.as_tensor(tgts[i])
                    row = lp[j, pos]
                    tl = row.gather(1, t[:, None]).squeeze(1)
                    right = row.argmax(1) == t
                    res["logprob"][i] = float(tl.sum())
                    res["mean_logprob"][i] = float(tl.mean())
                    res["n_tokens"][i] = len(t)
                    res["token_acc"][i] = float(right.double().mean())
                    res["exact"][i] = bool(right.all())
                    res["first_rank"][i] = float((row[0] > tl[0]).sum())
                    if return_tokens:
                        per_tok.append((i, tl.numpy()))
        if return_tokens:
            res["token_logprobs"] = [a for _, a in sorted(per_tok, key=lambda x: x[0])]
        return res

    def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int, batch_size: int = 64,
                 stop_at_eos: bool = False) -> list[list[int]]:
        """Greedy continuations (token ids) of each prompt, ``max_new_tokens`` long (shorter with ``stop_at_eos``),
        batched over right-padded prompts of any lengths (a causal model's outputs at real positions never see
        the padding)."""
        from ..hooks import require_eval

        require_eval(self.model, "Generation")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"The 'max_new_tokens' parameter must be an int in [0, inf). Got {max_new_tokens!r} instead.")
        seqs = [self.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        n_ctx = getattr(self.cfg, "n_ctx", None)
        too_long = [i for i, s in enumerate(seqs) if n_ctx and len(s) + max_new_tokens > n_ctx]
        if too_long:
            raise ValueError(f"Prompt {too_long[0]} has {len(seqs[too_long[0]])} tokens; with {max_new_tokens} new "
                             f"ones it exceeds the model's context of {n_ctx} tokens.")
        out: list[list[int]] = [[] for _ in seqs]
        with torch.no_grad():
            for b in range(0, len(seqs), batch_size):
                idx = list(range(b, min(b + batch_size, len(seqs))))
                cur = [list(seqs[i]) for i in idx]
                done = [False] * len(idx)
                for _ in range(max_new_tokens):
                    toks, lens = self.pad(cur)
                    lg = self.logits(toks)
                    nxt = lg[torch.arange(len(cur)), (lens - 1).to(lg.device)].argmax(-1).tolist()
                    for j, t in enumerate(nxt):
                        if not done[j]:
                            cur[j].append(int(t))
                            out[idx[j]].append(int(t))
                            done[j] = stop_at_eos and self.eos_id is not None and t == self.eos_id
                        else:
                            cur[j].append(self.pad_id)
                    if all(done):
                        break
        return out


@contextlib.contextmanager
def quiet_hf(bars: bool = False):
    """Hugging Face's progress bars off inside the block (unless ``bars``), restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def as_lm(model_or_lm, tokenizer=None, prepend_bos: bool | None = None) -> LM:
    """An :class:`LM` from an ``LM`` (returned as is), a ``(model, tokenizer)`` pair, or a memloc ``LMRun``."""
    if isinstance(model_or_lm, LM):
        if tokenizer is not None:
            raise ValueError("Give an LM handle or a model and its tokenizer, not both.")
        return model_or_lm
    if hasattr(model_or_lm, "lm") and callable(model_or_lm.lm) and tokenizer is None:
        return model_or_lm.lm(prepend_bos=prepend_bos)
    if tokenizer is None:
        raise TypeError("Language-model functions take an LM handle (memloc.LM(model, tokenizer) or "
                        "LM.from_pretrained(folder)); got a model without its tokenizer.")
    return LM(model_or_lm, tokenizer, prepend_bos)


OUT_MODULE = "blocks.{}.mlp.out"  # attribute path of the MLP output projection of a TransformerBridge block


def mlp_out_weight(model, layer: int, module: str = OUT_MODULE) -> tuple[str, torch.nn.Parameter, bool]:
    """``(parameter name, weight, transposed)`` of layer ``layer``'s MLP output matrix. ``transposed`` is True for
    Hugging Face ``Conv1D`` weights stored ``[in, out]`` (GPT-2); ``nn.Linear`` stores ``[out, in]``."""
    if not hasattr(model, "named_parameters"):  # an LM handle
        model = model.model
    mod = model
    try:
        for part in module.format(layer).split("."):
            mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    except (AttributeError, IndexError, TypeError) as e:
        raise ValueError(f"The model has no MLP output module {module.format(layer)!r} (a TransformerBridge has "
                         f"blocks.L.mlp.out): {e}") from None
    weights = [p for p in mod.parameters() if p.ndim == 2]
    if len(weights) != 1:
        raise ValueError(f"{module.format(layer)!r} must hold one weight matrix; it holds {len(weights)}.")
    w = weights[0]
    name = next(n for n, p in model.named_parameters() if p is w)
    d_mlp, d_model = model.cfg.d_mlp, model.cfg.d_model
    conv = any(type(m).__name__ == "Conv1D" for m in mod.modules())
    if tuple(w.shape) == (d_mlp, d_model) and (conv or d_mlp != d_model):
        return name, w, True
    if tuple(w.shape) == (d_model, d_mlp):
        return name, w, False
    raise ValueError(f"Unexpected MLP output weight shape {tuple(w.shape)} (d_model {d_model}, d_mlp {d_mlp}).")
