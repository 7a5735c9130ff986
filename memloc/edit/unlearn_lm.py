"""Unlearning on the language-model testbed: forget canaries or subjects of a fact world, against an oracle
retrained without them.

**Task.** :class:`LMTask` implements the task protocol of :mod:`memloc.edit.unlearn`, so :func:`~memloc.edit.
unlearn.unlearn` runs its methods on a language model (any :class:`~memloc.models.lm.LM` handle: a Hugging Face
model with a BPE tokenizer works as the testbed does). Examples are sentences (example id = row index), stored as
right-padded token ids with their true lengths; every mask comes from the lengths, never from the pad id (with
GPT-2's BOS = EOS = PAD = 0, a mask "id != pad" would drop each sequence's real end-of-text tokens). ``loss`` is
the next-token NLL summed over the real targets, ``logits`` are ``[B, T, V]``, ``kl`` is KL(reference || model)
of the next-token distributions summed over the real positions. Each example has a *continuation*: its last
``suffix`` tokens
(a canary's secret digits, a fact sentence's object, a profile sentence's objects); ``per_example`` gives
``loss``, ``suffix_loss`` (NLL of the continuation given the rest), ``suffix_exact`` (greedy decoding from the
prefix reproduces the whole continuation: every teacher-forced argmax is right) and ``suffix_acc``.

**Splits** (:func:`lm_forget_split`): ``forget="canaries"`` (every canary sentence, all repeats),
``"canaries:NAME,NAME"`` (chosen canaries), ``"subjects:N"`` (the first N subjects, a random sample since names
are drawn at random), ``"subjects:NAME,NAME"`` or a list of canary/subject names. Forgetting a subject removes
every training sentence about it: its fact sentences and its profile sentences. Retain = every other training
sentence. Holdout (non-members for membership inference): for canaries, ``n_holdout`` canaries generated the
same way (new syllable names, new secrets of the same length) but never inserted (their names are not in the
vocabulary, so they read as ``<unk>``, like any unseen name); for subjects, the forgotten facts in their held-out
paraphrase templates, or, on a biography world (the GPT-2 testbed, whose training texts are biographies), as many
biographies of people never trained on as the forget set has (:meth:`memloc.data.bios.BioWorld.fresh_biographies`:
the same templates and name pools, attributes drawn at random), so members and non-members have the same format. Membership and forget quality are measured on the *continuation* loss of the distinct forget
sentences of the holdout's kind (each canary once; the subjects' training-template fact sentences), so the
template words around it do not decide them.

**Oracle** (:func:`train_lm_oracle`): :func:`~memloc.models.transformer.train_lm` with the run's own settings
(architecture, seed, learning rate, batch size, stopping rule) on exactly the retain sentences, with the
original vocabulary (so the initialisation is the same); written to ``RUN/unlearn/<split>/oracle`` with its
``training_text.json`` (checked on reuse) and ``summary.json["unlearn_oracle"]`` (the excluded sentences). Its
``world.json`` is the world without the forgotten canaries, subjects and facts (what its stopping rule checked).

**Methods.** Through :func:`~memloc.edit.unlearn.unlearn` with :data:`LM_DEFAULTS`: ``grad_ascent``,
``grad_diff``, ``npo``, ``finetune`` (Adam on summed sentence NLL; forget-set methods 60 steps of 16 at lr 1e-4,
finetune 300 steps of 64 at lr 1e-3, the testbed's own lr and batch) and three for language models:

- ``zero_neurons``: integrated-gradient attribution (:func:`memloc.locate.knowledge.attribute`, zero baseline,
  ``ig_steps``) of every continuation token of the distinct forget sentences, given its prefix, to the MLP
  hidden neurons (``blocks.{l}.mlp.hook_post``) of ``layers`` (default all); the ``n_neurons`` with the highest
  mean attribution are zeroed for good by zeroing their rows of the MLP input matrix and their input bias, so the
  neuron's activation is ``act(0) = 0`` exactly as :func:`memloc.hooks.ablate` on ``hook_post`` makes it.
- ``random_neurons``: the control: as many random neurons per layer as ``zero_neurons`` picks there.
- ``rome``: a ROME overwrite (:func:`memloc.edit.rome.rome`) of each forget item's first continuation token, one
  edit after another, each applied for good before the next is computed, at ``layer`` (0) with ``C`` the key
  second moment over the training text: a canary ``"the code of {} is" -> a different digit``, a forgotten fact
  (first training template of its relation) ``-> a different object`` of the relation; the new target is drawn
  with the method seed.

**Evaluation** (:func:`evaluate_lm_unlearning`, :func:`compare_lm_unlearning`): ``forget_exact`` (canaries:
greedy exact-match extraction rate, :func:`memloc.analyses.lm.canary_extraction`; subjects: top-1 recall of their
facts from training templates), ``forget_exposure`` (mean exposure of the forget canaries, bits), ``other_canaries``
(extraction of the canaries not forgotten), ``recall_train`` / ``recall_heldout`` (top-1 fact recall of the retained
subjects from training / held-out templates), ``mia_auc`` (loss attack on continuation NLL, forget vs holdout),
``ks_stat, ks_p`` (two-sample KS test of per-item forget continuation NLL against the oracle's) with the power check
(original vs oracle must give p < 0.05, else ``ks_can_tell`` is False).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..data.facts import Canary, FactWorld
from ..hooks import require_eval
from ..results import load_result, make_result, read_json, save_result, write_json
from .unlearn import (RELEARN_DEFAULTS, Split, Task, _generator, _params, _row_frame, forget_quality, mia_auc,
                      relearn, unlearn)

__all__ = ["LMTask", "LMSplit", "lm_forget_split", "lm_task", "train_lm_oracle", "LM_DEFAULTS", "LM_METHODS",
           "attributed_neurons", "evaluate_lm_unlearning", "compare_lm_unlearning", "plot_lm_tradeoff"]

MLP_IN = "blocks.{}.mlp.in"  # the MLP input projection of a TransformerBridge block (hidden neurons = its rows)


# ----------------------------------------------------------------------------------------------- the task

class LMTask(Task):
    """The task protocol (:mod:`memloc.edit.unlearn`) for a language model on a list of sentences.

    Args:
        lm: the :class:`~memloc.models.lm.LM` handle (its tokenizer and BOS policy encode the texts; its model's
            device is where batches go).
        texts: sentences, or ``(tokens [N, T], lengths [N])`` already encoded and right-padded.
        suffix: continuation length in tokens per example (int or ``[N]``; default 1, the last token).
        info: optional per-example ``DataFrame`` (``subject, relation, prompt, target, choices``) that the
            ``rome`` method reads its requests from (:func:`lm_task` fills it).
        eval_batch_size: batch size of :meth:`per_example`.
    """

    def __init__(self, lm, texts, suffix=None, info: pd.DataFrame | None = None, eval_batch_size: int = 512):
        from ..models.lm import as_lm

        self.lm = as_lm(lm)
        self.info, self.eval_batch_size = info, eval_batch_size
        if isinstance(texts, tuple) and len(texts) == 2 and isinstance(texts[0], torch.Tensor):
            self.tokens, self.lengths = texts[0].long(), torch.as_tensor(texts[1]).long()
            if len(self.lengths) != len(self.tokens) or int(self.lengths.max()) > self.tokens.shape[1]:
                raise ValueError("tokens [N, T] and lengths [N] do not match.")
            self.texts = [self.lm.decode(t[:n]) for t, n in zip(self.tokens, self.lengths)]
        elif isinstance(texts, torch.Tensor):
            raise ValueError("Give encoded texts as (tokens, lengths): a padded tensor alone cannot say where each "
                             "sequence ends (its pad id may be a real token, e.g. GPT-2's end-of-text).")
        else:
            self.texts = list(texts)
            self.tokens, self.lengths = self.lm.batch(self.texts)
        n = len(self.tokens)
        suffix = np.broadcast_to(np.asarray(1 if suffix is None else suffix, dtype=np.int64), (n,))
        if (suffix < 1).any() or (suffix > self.lengths.numpy() - 1).any():
            bad = int(np.flatnonzero((suffix < 1) | (suffix > self.lengths.numpy() - 1))[0])
            raise ValueError(f"Every example's suffix must be in [1, its length - 1] tokens (the first token is never "
                             f"a target); example {bad} has {int(self.lengths[bad])} tokens and a suffix of "
                             f"{int(suffix[bad])}.")
        self.suffix = torch.as_tensor(suffix.copy())

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def device(self) -> torch.device:
        return self.lm.device

    defaults: dict[str, dict]  # set below, after the methods are defined
    extra_methods: dict

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, ids) -> dict[str, torch.Tensor]:
        """``tokens [B, T]`` (trimmed to the longest, on the model's device), ``lengths, suffix, example_id [B]``."""
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        T = int(self.lengths[ids].max())
        return {"tokens": self.tokens[ids, :T].to(self.device), "lengths": self.lengths[ids],
                "suffix": self.suffix[ids], "example_id": ids}

    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """``[B, T, V]``."""
        return model(batch["tokens"])

    def _real(self, batch, T: int) -> torch.Tensor:
        """``[B, T]``: True at real positions (from the lengths)."""
        return (torch.arange(T)[None] < batch["lengths"][:, None]).to(batch["tokens"].device)

    def _token_nll(self, logits, batch) -> tuple[torch.Tensor, torch.Tensor]:
        tgt = batch["tokens"][:, 1:]
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        return ce.view_as(tgt), self._real(batch, tgt.shape[1] + 1)[:, 1:]

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """``[B]`` next-token NLL summed over the real targets (as ``lm_loss(reduction="none")``)."""
        ce, mask = self._token_nll(logits, batch)
        return (ce * mask).sum(1)

    def kl(self, logits: torch.Tensor, ref_logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """``[B]`` KL(reference || model) of the next-token distributions, summed over real positions."""
        ref = F.log_softmax(ref_logits, -1)
        kl = (ref.exp() * (ref - F.log_softmax(logits, -1))).sum(-1)
        return (kl * self._real(batch, kl.shape[1])).sum(1)

    def _suffix_mask(self, batch) -> torch.Tensor:
        """``[B, T-1]``: target positions (of ``tokens[:, 1:]``) inside each example's continuation."""
        t = torch.arange(batch["tokens"].shape[1] - 1)[None]
        end = batch["lengths"][:, None] - 1  # target index of the last real token, minus one for the shift
        return (t >= end - batch["suffix"][:, None]) & (t < end)

    def per_example(self, model: nn.Module, ids) -> pd.DataFrame:
        """``example_id, loss, suffix_loss, suffix_exact, suffix_acc`` (eval mode required)."""
        require_eval(model, "Unlearning evaluation")
        parts = []
        with torch.no_grad():
            for b in self.batches(ids, self.eval_batch_size):
                logits = self.logits(model, b)
                ce, mask = self._token_nll(logits, b)
                suf = self._suffix_mask(b).to(ce.device)
                right = logits[:, :-1].argmax(-1) == b["tokens"][:, 1:]
                parts.append(pd.DataFrame({
                    "example_id": b["example_id"].numpy(), "loss": (ce * mask).sum(1).float().cpu().numpy(),
                    "suffix_loss": (ce * suf).sum(1).float().cpu().numpy(),
                    "suffix_exact": (right | ~suf).all(1).cpu().numpy(),
                    "suffix_acc": ((right & suf).sum(1) / b["suffix"].to(ce.device)).float().cpu().numpy()}))
        return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------------------------- splits

@dataclass(frozen=True)
class LMSplit(Split):
    """A forget/retain/holdout split of a fact world's sentences. ``texts`` are the task's examples: the training
    sentences (ids ``0 .. n_train-1``, in ``world.training_text()`` order) then the holdout sentences; ``info`` has
    one row per text (``kind, subject, relation, prompt, target, choices, suffix``); ``members`` are the distinct
    forget sentences of the holdout's kind (the members for membership inference and forget quality)."""

    texts: tuple[str, ...] = ()
    info: pd.DataFrame = field(default_factory=pd.DataFrame)
    members: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    canaries: tuple[Canary, ...] = ()
    subjects: tuple[str, ...] = ()
    n_train: int = 0
    facts: pd.DataFrame | None = None  # the forgotten subjects' facts in their first training template (for rome)


def _holdout_canaries(world: FactWorld, n: int, digits: int) -> list[Canary]:
    """``n`` canaries generated the way the world makes its own, never inserted
    (:func:`memloc.data.facts.holdout_canaries`)."""
    from ..data.facts import holdout_canaries

    return holdout_canaries(world, n, digits)


def _split_name(kind: str, names: list[str]) -> str:
    if len(names) <= 3:
        return kind + "-" + "-".join(names)
    return kind + "-" + hashlib.sha1(",".join(sorted(names)).encode()).hexdigest()[:10]


def lm_forget_split(world: FactWorld, forget: str | Sequence[str] = "canaries", n_holdout: int = 32) -> LMSplit:
    """The split of ``world``'s training sentences (see the module docstring for ``forget``)."""
    canaries = {c.name: c for c in world.canaries}
    subjects = list(world.subjects)
    if isinstance(forget, str):
        kind, _, rest = forget.partition(":")
        rest = [x.strip() for x in rest.split(",") if x.strip()]
        if kind == "canaries":
            names, name = (rest or list(canaries)), ("canaries" if not rest else _split_name("canaries", rest))
            bad = [x for x in names if x not in canaries]
            if bad:
                raise ValueError(f"Unknown canar(y/ies) {bad}; the world's canaries are {list(canaries)}.")
        elif kind == "subjects":
            if len(rest) == 1 and rest[0].isdigit():
                n = int(rest[0])
                if not 1 <= n < len(subjects):
                    raise ValueError(f"subjects:N needs N in [1, {len(subjects) - 1}]; got {n}.")
                names, name = subjects[:n], f"subjects-{n}"
            else:
                names, name = rest, _split_name("subjects", rest)
                bad = [x for x in names if x not in subjects]
                if bad or not names:
                    raise ValueError(f"Unknown subject(s) {bad}; subjects are names like {subjects[:5]}.")
        else:
            names = [x.strip() for x in forget.split(",") if x.strip()]
            name = None
    else:
        names, name = [str(x) for x in forget], None
    bad = [x for x in names if x not in canaries and x not in subjects]
    if bad or not names:
        raise ValueError(f"The 'forget' parameter must be 'canaries', 'canaries:NAME,...', 'subjects:N', "
                         f"'subjects:NAME,...' or canary/subject names. Got {forget!r} (unknown: {bad[:5]}); "
                         f"canaries are {list(canaries)}, subjects e.g. {subjects[:5]}.")
    if name is None:
        name = _split_name("names", names)
    f_canaries = tuple(c for c in world.canaries if c.name in names)
    f_subjects = tuple(s for s in subjects if s in names)

    # label every training sentence: canary / fact / profile, with its subject
    canary_of = {c.text: c for c in world.canaries}
    fact_of = {f"{t.format(s=f.subject)} {f.object}": (f, t.replace("{s}", "{}")) for f in world.facts
               for t in world.relations[f.relation][1]}
    subject_set = set(subjects)
    digits = [str(d) for d in range(10)]
    rows = []

    def fact_row(kind, f, tmpl):
        return {"kind": kind, "subject": f.subject, "relation": f.relation, "prompt": tmpl, "target": f.object,
                "choices": "|".join(world.relations[f.relation][0]), "continuation": f.object}

    def canary_row(kind, c):
        return {"kind": kind, "subject": c.name, "relation": "canary", "prompt": "the code of {} is",
                "target": c.secret[0], "choices": "|".join(digits), "continuation": c.secret_text}

    texts = world.training_text()
    by_length = sorted(subjects, key=len, reverse=True)
    for t in texts:
        if t in canary_of:
            rows.append(canary_row("canary", canary_of[t]))
        elif t in fact_of:
            rows.append(fact_row("fact", *fact_of[t]))
        elif world.settings.get("kind") == "bios":  # a biography: it starts with the person's name
            who = next((x for x in by_length if t.startswith(x + " ")), None)
            if who is None:
                raise ValueError(f"Cannot tell whose biography {t!r} is.")
            rows.append({"kind": "bio", "subject": who, "relation": None, "prompt": None, "target": None,
                         "choices": None, "continuation": t[len(who) + 1:]})
        elif t.split()[0] in subject_set:
            rows.append({"kind": "profile", "subject": t.split()[0], "relation": None, "prompt": None,
                         "target": t.split()[1], "choices": None, "continuation": " ".join(t.split()[1:])})
        else:
            raise ValueError(f"Cannot tell what the training sentence {t!r} is about.")
    n_train = len(texts)
    holdout_texts = []
    if f_canaries:
        for c in _holdout_canaries(world, n_holdout, len(f_canaries[0].secret)):
            holdout_texts.append(c.text)
            rows.append(canary_row("holdout_canary", c))
    bios = world.settings.get("kind") == "bios"
    if f_subjects and bios:  # biographies of people never trained on, as many as the forget set's distinct ones
        n_bio = len({t for t, r in zip(texts, rows) if r["kind"] == "bio" and r["subject"] in set(f_subjects)})
        for who, t in world.fresh_biographies(n_bio):
            holdout_texts.append(t)
            rows.append({"kind": "holdout_bio", "subject": who, "relation": None, "prompt": None, "target": None,
                         "choices": None, "continuation": t[len(who) + 1:]})
    for f in world.facts:
        if f.subject in f_subjects and not bios:
            for t in world.relations[f.relation][2]:
                holdout_texts.append(f"{t.format(s=f.subject)} {f.object}")
                rows.append(fact_row("holdout_fact", f, t.replace("{s}", "{}")))
    info = pd.DataFrame(rows)
    train_info = info.iloc[:n_train]
    is_forget = ((train_info.kind == "canary") & train_info.subject.isin([c.name for c in f_canaries])) | (
        train_info.kind.isin(["fact", "profile", "bio"]) & train_info.subject.isin(f_subjects))
    forget_ids = np.flatnonzero(is_forget.to_numpy())
    retain_ids = np.flatnonzero(~is_forget.to_numpy())
    if len(retain_ids) == 0:
        raise ValueError("The forget set is the whole training set; nothing would be retained.")
    all_texts = tuple(texts + holdout_texts)
    seen, members = set(), []
    for i in forget_ids:
        if train_info.kind.iloc[i] in ("canary", "fact", "bio") and all_texts[i] not in seen:
            seen.add(all_texts[i])
            members.append(i)
    facts = pd.DataFrame([fact_row("fact", f, world.relations[f.relation][1][0].replace("{s}", "{}"))
                          for f in world.facts if f.subject in set(f_subjects)])
    return LMSplit(forget=forget_ids, retain=retain_ids, holdout=np.arange(n_train, len(all_texts)), name=name,
                   texts=all_texts, info=info, members=np.asarray(members, dtype=np.int64), canaries=f_canaries,
                   subjects=f_subjects, n_train=n_train, facts=facts)


def continuation_tokens(lm, texts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
    """How many tokens of each text (as the handle encodes it) its continuation (the text's end) takes: the
    tokens of the whole text minus those of the text without the continuation."""
    out = []
    for t, c in zip(texts, continuations):
        if not t.endswith(c):
            raise ValueError(f"{c!r} is not the end of {t!r}.")
        head = t[:len(t) - len(c)].rstrip()
        full, pre = lm.encode(t), lm.encode(head)
        out.append(len(full) - len(pre) if full[:len(pre)] == pre else len(lm.target_ids(c, head)))
    return np.asarray(out, dtype=np.int64)


def lm_task(lm, split: LMSplit, **kw) -> LMTask:
    """The :class:`LMTask` over a split's texts (training sentences, then holdout), with ``info`` for ``rome``;
    each example's suffix is its continuation (secret digits, object, profile objects) counted in the handle's
    tokens."""
    from ..models.lm import as_lm

    lm = as_lm(lm)
    info = split.info.copy()
    info["suffix"] = continuation_tokens(lm, list(split.texts), info.continuation.tolist())
    task = LMTask(lm, list(split.texts), suffix=info.suffix.to_numpy(), info=info, **kw)
    task.facts = split.facts
    return task


# ----------------------------------------------------------------------------------------------- the oracle

@dataclass
class _RetainedWorld(FactWorld):
    """The world without the forget set: ``training_text()`` is exactly the retain sentences and ``words()`` the
    original vocabulary (same tokenizer, hence the same initialisation)."""

    text: list = field(default_factory=list)
    vocab: list = field(default_factory=list)

    def training_text(self) -> list[str]:
        return list(self.text)

    def words(self) -> list[str]:
        return list(self.vocab)


def train_lm_oracle(run, split: LMSplit, out: str | Path | None = None, progress: bool = True):
    """Train ``run``'s settings on exactly ``split``'s retain sentences; returns the oracle
    :class:`~memloc.models.transformer.LMRun` (``out`` default ``RUN/unlearn/<split>/oracle``; a finished oracle
    is reused after checking its ``training_text.json``). A GPT-2 testbed's oracle keeps the run's tokenizer (the
    same token ids) and every training setting; a word testbed's keeps its vocabulary and stopping rule."""
    out = Path(out or Path(run.path) / "unlearn" / split.name / "oracle")
    world, c = run.world, run.config
    retain_text = [split.texts[i] for i in split.retain]
    text_path = out / "training_text.json"
    if text_path.exists() and read_json(text_path)["text"] != retain_text:
        raise RuntimeError(f"The oracle at {out} was trained on other sentences than this split's retain set; "
                           "remove the folder or choose another out=.")
    gone = {c_.name for c_ in split.canaries}
    kept = dict(subjects=[s for s in world.subjects if s not in split.subjects], relations=world.relations,
                facts=[f for f in world.facts if f.subject not in split.subjects],
                canaries=[c_ for c_ in world.canaries if c_.name not in gone], seed=world.seed,
                settings=dict(world.settings), text=retain_text)
    if run.kind == "gpt2":
        from ..models.gpt2 import GPT2_DEFAULTS, train_gpt2

        retained = _RetainedWorld(**kept, vocab=[])
        oracle = train_gpt2(retained, out, texts=retain_text, tokenizer_dir=run.path, progress=progress,
                            **{k: c[k] for k in GPT2_DEFAULTS if k in c})  # a run older than a setting: its default
        if oracle.config["n_layers"] != c["n_layers"] or oracle.config["d_model"] != c["d_model"]:
            raise RuntimeError("The oracle's architecture differs from the run's.")
    else:
        from ..models.transformer import train_lm

        retained = _RetainedWorld(**kept, vocab=run.tokenizer.vocab[len(run.tokenizer.SPECIAL):])
        m = c["model"]
        oracle = train_lm(retained, out, n_layers=m["n_layers"], d_model=m["d_model"], n_heads=m["n_heads"],
                          d_mlp=m["d_mlp"], epochs=c["max_epochs"], lr=c["lr"], weight_decay=c["weight_decay"],
                          batch_size=c["batch_size"], target_recall=c["target_recall"],
                          min_epochs=c.get("min_epochs", 0), seed=c["seed"], progress=progress,
                          allow=("training_text.json",))
        if oracle.config["model"] != m:
            raise RuntimeError(f"The oracle's architecture {oracle.config['model']} differs from the run's {m}.")
    if not text_path.exists():
        write_json({"text": retain_text}, text_path)
    summary = oracle.summary
    if "unlearn_oracle" not in summary:
        forget_texts = [split.texts[i] for i in split.forget]
        summary["unlearn_oracle"] = {"source_run": str(run.path), "forget": split.name,
                                     "canaries": [c_.name for c_ in split.canaries], "subjects": list(split.subjects),
                                     "n_excluded": len(forget_texts), "excluded": sorted(set(forget_texts))}
        write_json(summary, out / "summary.json")
    return oracle


# ----------------------------------------------------------------------------------------------- methods

def _continuation_prompts(task: LMTask, ids) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Every continuation token of the distinct examples ``ids`` as (prefix, next token): right-padded
    ``tokens [P, T]``, ``lengths [P]``, ``targets``."""
    seqs, targets, seen = [], [], set()
    for i in np.asarray(ids):
        L, k = int(task.lengths[i]), int(task.suffix[i])
        toks = task.tokens[i, :L].tolist()
        if tuple(toks) in seen:
            continue
        seen.add(tuple(toks))
        for j in range(L - k, L):
            seqs.append(toks[:j])
            targets.append(toks[j])
    tokens, lengths = task.lm.pad(seqs)
    return tokens, lengths, targets


def attributed_neurons(model, task: LMTask, ids, layers: Sequence[int] | None = None, ig_steps: int = 20,
                       batch_size: int = 32) -> torch.Tensor:
    """Mean integrated-gradient attribution ``[len(layers), d_mlp]`` of each continuation token of ``ids`` (given
    its prefix) to the MLP hidden neurons (:func:`memloc.locate.knowledge.attribute`, zero baseline)."""
    from ..locate.knowledge import attribute

    layers = range(model.cfg.n_layers) if layers is None else layers
    tokens, lengths, targets = _continuation_prompts(task, ids)
    return torch.stack([attribute(model, tokens, lengths, targets, int(l), ig_steps, batch_size=batch_size)[0].mean(0)
                        for l in layers])


def _zero_mlp_neurons(model, chosen: dict[int, list[int]]) -> dict[str, int]:
    """Zero the chosen hidden neurons' rows of each layer's MLP input matrix and their input bias, in place;
    returns ``{parameter name: entries zeroed}``."""
    names = {id(p): n for n, p in model.named_parameters()}
    d_mlp, changed = model.cfg.d_mlp, {}
    with torch.no_grad():
        for layer, idx in chosen.items():
            mod = model
            for part in MLP_IN.format(layer).split("."):
                mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
            conv = any(type(m).__name__ == "Conv1D" for m in mod.modules())  # Hugging Face GPT-2: [in, out]
            for p in mod.parameters():
                i = torch.as_tensor(sorted(idx), device=p.device)
                if p.ndim == 2:  # nn.Linear stores [out = d_mlp, in]
                    dim = 1 if conv or p.shape[0] != d_mlp else 0
                    p.index_fill_(dim, i, 0.0)
                    changed[names[id(p)]] = len(i) * p.shape[1 - dim]
                else:
                    p[i] = 0.0
                    changed[names[id(p)]] = len(i)
    return changed


_ATTRIBUTIONS: dict[tuple, torch.Tensor] = {}


def _cached_attribution(ref, task: LMTask, ids, layers: list[int], ig_steps: int) -> torch.Tensor:
    """:func:`attributed_neurons`, remembered for the same weights, task texts, ids, layers and steps (the last
    4): ``random_neurons`` needs ``zero_neurons``' per-layer counts, and on a biography testbed the attribution of
    every continuation token is minutes of work."""
    from .sequential import _fingerprint

    h = hashlib.sha1(_fingerprint(ref.state_dict()).encode())
    h.update(task.tokens.numpy().tobytes())
    h.update(task.suffix.numpy().tobytes())
    h.update(np.asarray(ids, np.int64).tobytes())
    key = (h.hexdigest(), tuple(layers), int(ig_steps))
    if key not in _ATTRIBUTIONS:
        while len(_ATTRIBUTIONS) >= 4:
            _ATTRIBUTIONS.pop(next(iter(_ATTRIBUTIONS)))
        _ATTRIBUTIONS[key] = attributed_neurons(ref, task, ids, layers, ig_steps)
    return _ATTRIBUTIONS[key].clone()


def _neurons_method(random: bool):
    def run(new, ref, task, forget_ids, retain_ids, p, seed, progress):
        layers = list(range(ref.cfg.n_layers)) if p["layers"] is None else [int(l) for l in p["layers"]]
        scores = _cached_attribution(ref, task, forget_ids, layers, p["ig_steps"])  # [layers, d_mlp]
        top = torch.argsort(scores.flatten(), descending=True, stable=True)[:p["n_neurons"]]
        d = scores.shape[1]
        chosen: dict[int, list[int]] = {}
        for j in top.tolist():
            chosen.setdefault(layers[j // d], []).append(j % d)
        if random:  # as many random neurons in each layer as the attribution picks there
            g = _generator(seed, 13)
            chosen = {l: torch.randperm(d, generator=g)[:len(v)].tolist() for l, v in sorted(chosen.items())}
        chosen = {l: sorted(v) for l, v in sorted(chosen.items())}
        entries = _zero_mlp_neurons(new, chosen)
        return {"neurons": {f"blocks.{l}.mlp.hook_post": v for l, v in chosen.items()},
                "changed": {"parameters": list(entries), "entries": entries, "buffers": []}}
    return run


def _rome_requests(task: LMTask, forget_ids, seed: int) -> list[dict]:
    """One request per forgotten canary / fact: its prompt and a new first continuation token drawn with ``seed``."""
    if task.info is None:
        raise ValueError("The 'rome' method needs requests=[...] or a task made by lm_task() (it reads the forget "
                         "items' subjects and prompts from task.info).")
    rows = task.info.iloc[np.asarray(forget_ids)]
    info = rows[rows.prompt.notna()]
    facts = getattr(task, "facts", None)
    if facts is not None and len(facts):  # biographies / profiles: the subjects' facts in a training template
        told = rows[rows.prompt.isna()].subject
        info = pd.concat([info, facts[facts.subject.isin(set(told))]], ignore_index=True)
    info = info.drop_duplicates(["subject", "relation"])
    rng = np.random.default_rng([seed, 17])
    out = []
    for r in info.itertuples():
        choices = [c for c in r.choices.split("|") if c != r.target]
        out.append({"prompt": r.prompt, "subject": r.subject, "target_true": r.target,
                    "target_new": choices[int(rng.integers(len(choices)))]})
    if not out:
        raise ValueError("No forget item has a prompt to rewrite (profile sentences only).")
    return out


def _rome_method(new, ref, task, forget_ids, retain_ids, p, seed, progress):
    from tqdm.auto import tqdm

    from .rome import EditConfig, Request, key_second_moment, rome

    from ..models.lm import LM

    requests = p["requests"] or _rome_requests(task, forget_ids, seed)
    cfg = EditConfig(v_steps=p["v_steps"], clamp_norm_factor=p["clamp_norm_factor"])
    train = np.union1d(forget_ids, retain_ids)
    ref_lm = LM(ref, task.lm.tokenizer, task.lm.prepend_bos, name=task.lm.name)
    new_lm = LM(new, task.lm.tokenizer, task.lm.prepend_bos, name=task.lm.name)
    C = key_second_moment(ref_lm, [task.texts[i] for i in train], p["layer"])
    edits, name = [], None
    for r in tqdm(requests, desc="rome", disable=not progress, leave=False):
        req = Request(r["prompt"], r["subject"], r["target_new"], r.get("target_true"))
        e = rome(new_lm, req, p["layer"], C, cfg, outcomes=False)
        e.apply(new)
        (name,) = e.deltas
        edits.append({**r, "nll_end": e.info["nll_end"], "rel_error": e.info["rel_error"]})
    numel = dict(new.named_parameters())[name].numel()
    return {"edits": edits, "c_tokens": int(C.count),
            "changed": {"parameters": [name], "entries": {name: numel}, "buffers": []}}


_LM_FORGET = {"steps": 60, "lr": 1e-4, "batch_size": 16, "schedule": "constant"}
LM_DEFAULTS: dict[str, dict[str, Any]] = {
    "grad_ascent": dict(_LM_FORGET),
    "grad_diff": {**_LM_FORGET, "forget_weight": 1.0, "retain_weight": 1.0, "kl_weight": 0.0},
    "npo": {**_LM_FORGET, "beta": 0.1, "retain_weight": 1.0},
    "finetune": {"steps": 300, "lr": 1e-3, "batch_size": 64, "schedule": "constant"},
    "zero_neurons": {"n_neurons": 256, "layers": None, "ig_steps": 20},
    "random_neurons": {"n_neurons": 256, "layers": None, "ig_steps": 20},
    "rome": {"layer": 0, "requests": None, "v_steps": 20, "clamp_norm_factor": 4.0},
}
LM_METHODS = tuple(LM_DEFAULTS)
LMTask.defaults = LM_DEFAULTS
LMTask.extra_methods = {"zero_neurons": _neurons_method(False), "random_neurons": _neurons_method(True),
                        "rome": _rome_method}


# ----------------------------------------------------------------------------------------------- evaluation

def _only(world: FactWorld, canaries=None, subjects=None) -> FactWorld:
    """A view of ``world`` restricted to some canaries / the facts of some subjects."""
    from dataclasses import replace

    w = world
    if canaries is not None:
        keep = {c.name for c in canaries}
        w = replace(w, canaries=[c for c in w.canaries if c.name in keep])
    if subjects is not None:
        keep = set(subjects)
        w = replace(w, facts=[f for f in w.facts if f.subject in keep])
    return w


def truth_ratios(lm, world: FactWorld, subjects: Sequence[str], n_perturbed: int = 3, seed: int = 0) -> np.ndarray:
    """TOFU's truth ratio per fact of ``subjects``: ``P(perturbed) / P(paraphrased)`` with length-normalised
    probabilities ``exp(-mean NLL per token)`` and the perturbed ones averaged in NLL (a geometric mean), as
    OpenUnlearning computes it. The fact world has no reworded answers, so the *question* is paraphrased: the
    correct answer after the fact's first held-out template; the perturbed answers are ``n_perturbed`` other
    objects of the same relation (seeded) after the same prompt. Near 0: the model prefers the truth; near 1: it
    cannot tell."""
    rng = np.random.default_rng(seed + 31337)
    prompts, targets, groups = [], [], []
    for i, f in enumerate(x for x in world.facts if x.subject in set(subjects)):
        held = world.prompts(f, "heldout")
        if not held:
            continue
        others = sorted(set(world.relations[f.relation][0]) - {f.object})
        pick = [others[int(j)] for j in rng.permutation(len(others))[:n_perturbed]]
        for t in [f.object] + pick:
            prompts.append(held[0])
            targets.append(t)
            groups.append(i)
    if not prompts:
        return np.zeros(0)
    nll = -np.asarray(lm.score(prompts, targets)["mean_logprob"], dtype=np.float64)
    groups = np.asarray(groups)
    out = []
    for g in np.unique(groups):
        v = nll[groups == g]
        out.append(float(np.exp(-v[1:].mean()) / (np.exp(-v[0]) + 1e-10)))
    return np.asarray(out)


def _item_names(split: LMSplit, ids) -> list[str]:
    """The canary or subject names of training texts ``ids``, in order of first appearance."""
    names = split.info.subject.iloc[np.asarray(ids)].tolist()
    return list(dict.fromkeys(names))


def _forget_exact(lm, split: LMSplit, world: FactWorld, items) -> float:
    """Greedy extraction of the canaries and top-1 training-template recall of the subjects among ``items``."""
    from ..analyses.lm import canary_extraction, fact_recall

    items = set(items)
    cs = [c for c in split.canaries if c.name in items]
    subj = [s_ for s_ in split.subjects if s_ in items]
    parts = []
    if cs:
        parts.append(canary_extraction(lm, _only(world, canaries=cs)).extracted.to_numpy(bool))
    if subj:
        parts.append(fact_recall(lm, _only(world, subjects=subj), "train").correct.to_numpy(bool))
    return float(np.concatenate(parts).mean())


def lm_relearn_row(model, task: "LMTask", split: LMSplit, world: FactWorld, attack: dict, seed: int = 0) -> dict:
    """The relearning attack on a language model: fine-tune on the training texts of a seeded ``fraction`` of
    the forget *items* (canaries or subjects; :data:`memloc.edit.unlearn.RELEARN_DEFAULTS` for the steps), then
    measure the items the attack did not show: ``forget_exact_held_before`` / ``relearn_forget_exact_held``
    (canary extraction or fact recall of the held items before / after) and ``retain_relearn_forget_exact`` (all
    forget items after fine-tuning on as many retain texts instead)."""
    from ..models.lm import LM
    from ..validate import number

    p = {**RELEARN_DEFAULTS, **attack}
    number("fraction", p["fraction"], lo=0.0, hi=1.0, lo_open=True, hi_open=True)
    names = _item_names(split, split.forget)
    if len(names) < 2:
        raise ValueError("The relearning attack needs at least 2 forget items (one to relearn, one to hold out).")
    rng = np.random.default_rng(seed + 7)
    order = [names[int(i)] for i in rng.permutation(len(names))]
    k = max(1, min(len(names) - 1, int(round(p["fraction"] * len(names)))))
    shown, held = set(order[:k]), order[k:]
    ids = np.asarray([i for i in split.forget if split.info.subject.iloc[i] in shown])
    retain = np.asarray(split.retain)[rng.permutation(len(split.retain))[:len(ids)]]
    kw = {x: p[x] for x in ("steps", "lr", "batch_size")}

    def exact(m, items):
        return _forget_exact(LM(m, task.lm.tokenizer, task.lm.prepend_bos, name=task.lm.name), split, world, items)

    a = relearn(model, task, ids, seed=seed, **kw)
    b = relearn(model, task, retain, seed=seed, **kw)
    return {"forget_exact_held_before": exact(model, held), "relearn_forget_exact_held": exact(a, held),
            "retain_relearn_forget_exact": exact(b, names)}


KNOWMEM_RETAIN_SUBJECTS = 20
"""Retained subjects (a seeded sample) whose held-out-template facts give ``knowmem_retain``."""


def _retain_sample(world: FactWorld, split: LMSplit, n: int = KNOWMEM_RETAIN_SUBJECTS) -> list[str]:
    kept = [s_ for s_ in world.subjects if s_ not in set(split.subjects)]
    rng = np.random.default_rng(4321)
    return [kept[int(i)] for i in sorted(rng.permutation(len(kept))[:n])]


def evaluate_lm_unlearning(model, task: LMTask, split: LMSplit, world: FactWorld, oracle_losses=None,
                           exposure_candidates: int = 10_000, oracle_truth=None) -> dict:
    """One table row (module docstring): ``forget_exact, forget_exposure, other_canaries, recall_train,
    recall_heldout, forget_loss, mia_auc`` and, with the oracle's per-item forget losses, ``ks_stat, ks_p``;
    ``mink_auc`` (Min-K%, k 0.4, distinct forget texts vs holdout: PrivLeak's AUC), ``truth_ratio`` (mean of
    ``min(tr, 1/tr)`` over the forgotten subjects' facts, :func:`truth_ratios`; NaN for canaries, which have no
    paraphrase) and, with the oracle's truth ratios, ``truth_ratio_fq`` (OpenUnlearning's forget quality: the KS
    p-value between the two truth-ratio distributions); MUSE's ``verbmem_forget`` (ROUGE-L F1 of the greedy
    continuation of each distinct forget text's second half, :func:`memloc.analyses.lm.verbatim_memorization`),
    ``knowmem_forget`` and ``knowmem_retain`` (ROUGE-L F1 of greedy answers to the held-out-template prompts of the
    forgotten subjects' facts, NaN for canaries, and of :data:`KNOWMEM_RETAIN_SUBJECTS` retained subjects' facts:
    MUSE's utility; :func:`memloc.analyses.lm.knowledge_memorization`).
    Exposure ranks the secret among all digit strings up to ``exposure_candidates`` (4 digits: 10^4, exact; about
    40 s per model on one thread), among a sample of that many beyond."""
    from ..analyses.lm import canary_extraction, exposure, fact_recall
    from ..models.lm import LM

    lm = LM(model, task.lm.tokenizer, task.lm.prepend_bos, name=task.lm.name)
    row: dict[str, Any] = {}
    exact = []
    if split.canaries:
        fw = _only(world, canaries=split.canaries)
        exact.append(canary_extraction(lm, fw).extracted.to_numpy(bool))
        row["forget_exposure"] = float(exposure(lm, fw, exposure_candidates).exposure.mean())
    else:
        row["forget_exposure"] = np.nan
    if split.subjects:
        exact.append(fact_recall(lm, _only(world, subjects=split.subjects), "train").correct.to_numpy(bool))
    row["forget_exact"] = float(np.concatenate(exact).mean())
    others = [c for c in world.canaries if c not in split.canaries]
    row["other_canaries"] = (float(canary_extraction(lm, _only(world, canaries=others)).extracted.mean())
                             if others else np.nan)
    kept = _only(world, subjects=[s for s in world.subjects if s not in split.subjects])
    row["recall_train"] = float(fact_recall(lm, kept, "train").correct.mean())
    row["recall_heldout"] = float(fact_recall(lm, kept, "heldout").correct.mean())
    f = task.per_example(model, split.members).suffix_loss
    h = task.per_example(model, split.holdout).suffix_loss
    row["forget_loss"] = float(f.mean())
    row["mia_auc"] = mia_auc(f, h)
    if oracle_losses is not None:
        row["ks_stat"], row["ks_p"] = forget_quality(f, oracle_losses)
    row["_forget_losses"] = f.to_numpy()
    # MUSE / OpenUnlearning: Min-K% (k 0.4) AUC of the distinct forget texts vs the holdout, for PrivLeak
    from ..analyses.lm_attacks import attack_scores
    from ..analyses.privacy import roc_summary

    texts = [split.texts[i] for i in split.members] + [split.texts[i] for i in split.holdout]
    mk = attack_scores(lm, texts, ["mink"], k=0.4).mink.to_numpy()
    row["mink_auc"] = roc_summary(mk, np.r_[np.ones(len(split.members), bool), np.zeros(len(split.holdout), bool)])["auc"]
    # MUSE: verbatim memorization of the distinct forget texts, knowledge memorization of the forgotten and of
    # (a seeded sample of) the retained subjects' facts asked with held-out templates
    from ..analyses.lm import knowledge_memorization, verbatim_memorization

    forget_texts = list(dict.fromkeys(split.texts[i] for i in split.forget))
    row["verbmem_forget"] = float(verbatim_memorization(lm, forget_texts).rouge.mean())
    row["knowmem_forget"] = (float(knowledge_memorization(lm, _only(world, subjects=split.subjects)).rouge.mean())
                             if split.subjects else np.nan)
    row["knowmem_retain"] = float(knowledge_memorization(lm, _only(world, subjects=_retain_sample(world, split))
                                                         ).rouge.mean())
    tr = truth_ratios(lm, world, split.subjects) if split.subjects else np.zeros(0)
    row["truth_ratio"] = float(np.mean(np.minimum(tr, 1 / tr))) if len(tr) else np.nan
    row["truth_ratio_fq"] = (forget_quality(tr, oracle_truth)[1] if oracle_truth is not None and len(tr)
                             and len(oracle_truth) else np.nan)
    return row


COLUMNS = ["method", "forget_exact", "forget_exposure", "other_canaries", "recall_train", "recall_heldout",
           "forget_loss", "mia_auc", "ks_stat", "ks_p", "ks_can_tell", "mink_auc", "privleak", "truth_ratio",
           "truth_ratio_fq", "verbmem_forget", "knowmem_forget", "knowmem_retain", "changed_entries", "steps",
           "seconds"]
RELEARN_COLUMNS = ["forget_exact_held_before", "relearn_forget_exact_held", "retain_relearn_forget_exact"]


def _checked_methods(run, methods, params) -> tuple[list[str], dict, dict]:
    """A finished run, known methods and parameters for chosen methods only: ``(methods, params, effective
    parameters per method)``."""
    if run.summary is None:
        raise ValueError(f"{run.path} is not finished; rerun its `memloc lm train` command first.")
    methods = list(LM_METHODS) if methods is None else list(methods)
    bad = [m for m in methods if m not in LM_METHODS]
    if bad or not methods:
        raise ValueError(f"Unknown unlearning method(s) {bad} for a language model; valid methods are "
                         f"{list(LM_METHODS)} (or 'all').")
    params = params or {}
    for m in params:
        if m not in methods:
            raise ValueError(f"Parameters given for {m!r}, which is not among the methods {methods}.")
    return methods, params, {m: _params(m, params.get(m, {}), LM_DEFAULTS) for m in methods}


def compare_lm_unlearning(run, forget: str | Sequence[str] = "canaries", methods: Sequence[str] | None = None,
                          out: str | Path | None = None, seed: int = 0, params: dict[str, dict] | None = None,
                          n_holdout: int = 32, exposure_candidates: int = 10_000,
                          progress: bool = True, relearn: dict | None = None) -> pd.DataFrame:
    """Every LM method against the oracle on a finished :class:`~memloc.models.transformer.LMRun`: one row per
    method plus ``original`` and ``oracle`` (columns :data:`COLUMNS`, settings in ``attrs``).

    ``out`` (default ``RUN/unlearn``) gets ``<split name>/``: ``oracle/`` (resumable), ``rows/<method>.parquet``
    (also ``original`` and ``oracle``; reused when parameters, seed, oracle and evaluation settings match),
    ``table.parquet`` and ``tradeoff.png``. ``steps`` are optimiser steps (the oracle's: its epochs x batches per
    epoch). Exact exposure (``exposure_candidates``; one pass over the 10^(k-1) stems per canary, see
    :func:`evaluate_lm_unlearning`). ``privleak`` compares each row's ``mink_auc`` with the oracle's
    (:func:`memloc.analyses.lm_attacks.privleak`: MUSE's sign, negative = leaking). ``relearn`` (``{}`` for the
    defaults): the relearning attack on every row, oracle included (:func:`lm_relearn_row`; columns
    :data:`RELEARN_COLUMNS`).
    """
    from tqdm.auto import tqdm

    methods, params, effective = _checked_methods(run, methods, params)
    world = run.world
    split = lm_forget_split(world, forget, n_holdout)
    task = lm_task(run.lm(), split)
    folder = Path(out or Path(run.path) / "unlearn") / split.name
    from ..validate import mark_output
    mark_output(folder.parent, "unlearn")
    oracle_run = train_lm_oracle(run, split, folder / "oracle", progress=progress)
    original, oracle = run.model(), oracle_run.model()
    base = {"run": str(run.path), "config": {k: v for k, v in run.config.items()}, "forget": split.name,
            "forget_canaries": [c.name for c in split.canaries], "forget_subjects": list(split.subjects),
            "n_forget": int(len(split.forget)), "n_members": int(len(split.members)),
            "n_retain": int(len(split.retain)), "n_holdout": int(len(split.holdout)), "n_holdout_asked": n_holdout,
            "oracle": str(oracle_run.path), "oracle_epochs": oracle_run.summary.get("epochs"),
            "oracle_steps": oracle_run.summary.get("steps"), "seed": seed,
            "exposure_candidates": exposure_candidates,
            "mia": "loss attack on continuation NLL, distinct forget items vs holdout (" +
                   ("never-inserted canaries" if split.canaries else "") + (" + " if split.canaries and
                   split.subjects else "") + (("biographies of people never trained on" if
                                               world.settings.get("kind") == "bios" else "held-out-template prompts")
                                              if split.subjects else "") + ")",
            "forget_quality": "two-sample KS test of per-item forget continuation NLL vs the oracle's",
            "privleak": "Min-K% (k 0.4) AUC, distinct forget texts vs holdout, against the oracle's (MUSE's sign)",
            "truth_ratio": "TOFU's P(perturbed) / P(correct) per forgotten fact, the question paraphrased by the "
                           "first held-out template, 3 other objects of the relation as perturbed answers",
            "verbmem": "MUSE's VerbMem: ROUGE-L F1 of the greedy continuation of the second half of each distinct "
                       "forget text",
            "knowmem": f"MUSE's KnowMem: ROUGE-L F1 of greedy answers to held-out-template prompts (forgotten "
                       f"subjects; {KNOWMEM_RETAIN_SUBJECTS} seeded retained subjects for knowmem_retain)",
            "holdout_sha1": hashlib.sha1("\n".join(split.texts[i] for i in split.holdout).encode()).hexdigest()[:16],
            "relearn": None if relearn is None else {**RELEARN_DEFAULTS, **relearn}, "evaluation": 3}
    keys = ("params", "seed", "oracle", "n_holdout", "n_holdout_asked", "holdout_sha1", "exposure_candidates",
            "relearn", "evaluation")

    def reuse(name: str, settings: dict) -> pd.DataFrame | None:
        """A finished row made with the same parameters, seed, oracle and evaluation settings."""
        path = folder / "rows" / f"{name}.parquet"
        if not path.exists():
            return None
        old = load_result(path)
        same = {k: old.attrs["settings"].get(k) for k in keys}
        return old if same == json.loads(json.dumps({k: settings.get(k) for k in keys})) else None

    oracle_losses = task.per_example(oracle, split.members).suffix_loss.to_numpy()
    from ..models.lm import LM

    oracle_truth = (truth_ratios(LM(oracle, task.lm.tokenizer, task.lm.prepend_bos), world, split.subjects)
                    if split.subjects else None)

    def evaluate(model) -> dict:
        row = evaluate_lm_unlearning(model, task, split, world, oracle_losses, exposure_candidates, oracle_truth)
        if relearn is not None:
            row.update(lm_relearn_row(model, task, split, world, relearn, seed))
        return row

    os_ = oracle_run.summary
    oracle_steps = os_["steps"] if "steps" in os_ else os_["epochs"] * math.ceil(len(split.retain) /
                                                                                 run.config["batch_size"])
    rows = []
    for name, model, extra in [("original", original, {"changed_entries": 0, "steps": 0, "seconds": 0.0}),
                               ("oracle", oracle, {"changed_entries": np.nan, "steps": oracle_steps,
                                                   "seconds": float(oracle_run.summary["seconds"])})]:
        df = reuse(name, base)
        if df is None:
            row = evaluate(model)
            df = _row_frame(name, {**row, **extra}, base)
            save_result(df, folder / "rows" / f"{name}.parquet")
        rows.append(df)
    ks_power = float(rows[0].ks_p.iloc[0])
    can_tell = ks_power < 0.05
    for m in tqdm(methods, desc="unlearn", disable=not progress):
        settings = {**base, "method": m, "params": effective[m]}
        df = reuse(m, settings)
        if df is not None:
            rows.append(df)
            continue
        new, rec = unlearn(original, task, split.forget, split.retain, m, seed=seed, progress=progress,
                           **params.get(m, {}))
        row = evaluate(new)
        row["changed_entries"] = int(sum(rec["changed"]["entries"].values()))
        row["steps"] = int(rec["params"].get("steps", 0))
        row["seconds"] = rec["seconds"]
        df = _row_frame(m, row, {**settings, "record": rec})
        save_result(df, folder / "rows" / f"{m}.parquet")
        rows.append(df)
    table = pd.concat(rows, ignore_index=True)
    table["ks_can_tell"] = can_tell
    from ..analyses.lm_attacks import privleak

    ref_auc = float(table.loc[table.method == "oracle", "mink_auc"].iloc[0])
    table["privleak"] = [privleak(a, ref_auc) if np.isfinite(a) and ref_auc < 1 else np.nan for a in table.mink_auc]
    cols = COLUMNS + (RELEARN_COLUMNS if relearn is not None else [])
    table = make_result(table[cols], **base, ks_power_p=ks_power, ks_can_tell=bool(can_tell),
                        params={m: effective[m] for m in methods}, methods=methods)
    save_result(table, folder / "table.parquet")
    from ..analyses.plots import save_figure
    save_figure(plot_lm_tradeoff(table), folder / "tradeoff.png")
    return table


def plot_lm_tradeoff(table: pd.DataFrame):
    """Forget vs retain for a :func:`compare_lm_unlearning` table: the forget canaries' exposure (forget-set
    NLL without canaries) against fact recall from training templates, forget exact match against recall from
    held-out templates, and the membership AUC against training-template recall;
    original and oracle marked, settings in the title."""
    import textwrap

    import matplotlib.pyplot as plt

    s = table.attrs.get("settings", {})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    marks = "ovD^<>phX8P"
    first = "forget_exposure" if table.forget_exposure.notna().any() else "forget_loss"
    pairs = [(first, "recall_train"), ("forget_exact", "recall_heldout"), ("mia_auc", "recall_train")]
    for k, (_, r) in enumerate(table.iterrows()):
        style = {"original": dict(marker="s", color="black", s=70), "oracle": dict(
            marker="*", color="gold", edgecolor="black", s=260)}.get(r.method, dict(marker=marks[k % len(marks)], s=60))
        for ax, (x, y) in zip(axes, pairs):
            ax.scatter(r[x], r[y], label=r.method, zorder=3, alpha=0.85, **style)
    labels = {"forget_exact": "forget exact match (greedy; lower = forgotten)",
              "forget_exposure": "forget canaries' exposure, bits (lower = forgotten)",
              "forget_loss": "forget continuation NLL (higher = forgotten)",
              "mia_auc": "membership AUC, forget vs holdout (oracle's is the target)",
              "recall_train": "fact recall, training templates (retained)",
              "recall_heldout": "fact recall, held-out templates (retained)"}
    for ax, (x, y) in zip(axes, pairs):
        ax.set(xlabel=labels[x], ylabel=labels[y])
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="best")
    cfg = s.get("config", {})
    mc = cfg.get("model", {})
    params = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in p.items() if v is not None)
                       for m, p in s.get("params", {}).items())
    fig.suptitle(f"Unlearning {s.get('forget', '?')} ({s.get('n_forget', '?')} sentences) from a "
                 f"{mc.get('n_layers', '?')}-layer d{mc.get('d_model', '?')} transformer (seed {cfg.get('seed', '?')}); "
                 f"oracle retrained without them ({s.get('oracle_epochs', '?')} epochs); method seed "
                 f"{s.get('seed', '?')}; KS power p = {s.get('ks_power_p', float('nan')):.2g}\n"
                 + textwrap.fill(params, 230), fontsize=7)
    return fig


SEQUENTIAL_COLUMNS = ["method", "request", "n_items", "forget_exact", "verbmem_forget", "knowmem_forget",
                      "pending_exact", "recall_train", "knowmem_retain", "seconds"]


def sequential_lm_unlearning(run, forget: str | Sequence[str] = "subjects:20", methods: Sequence[str] | None = None,
                             requests: int = 4, out: str | Path | None = None, seed: int = 0,
                             params: dict[str, dict] | None = None, progress: bool = True) -> pd.DataFrame:
    """MUSE's sustainability: the forget items (canaries or subjects, in the split's order) come as ``requests``
    unlearning requests of about equal size; each method unlearns request ``i`` from the model left by request
    ``i - 1`` (same retain set, the split's; method seed ``seed + i``). After each request, on the items
    requested so far: ``forget_exact`` (canary extraction / training-template fact recall), ``verbmem_forget``,
    ``knowmem_forget`` (NaN for canaries); on the items not yet requested: ``pending_exact`` (collateral
    forgetting ahead of the request); utility: ``recall_train`` of the split's retained subjects and
    ``knowmem_retain`` (:data:`KNOWMEM_RETAIN_SUBJECTS` of them). Request 0 is the original model.

    ``out`` (default ``RUN/unlearn``) gets ``<split name>/sequential_<requests>/<method>.parquet`` (reused when the
    parameters and seed match), ``table.parquet`` and ``sequential.png``. Columns :data:`SEQUENTIAL_COLUMNS`.
    """
    from tqdm.auto import tqdm

    from ..analyses.lm import knowledge_memorization, verbatim_memorization
    from ..models.lm import LM

    methods, params, effective = _checked_methods(run, methods, params)
    world = run.world
    split = lm_forget_split(world, forget)
    names = _item_names(split, split.forget)
    if isinstance(requests, bool) or not isinstance(requests, int) or not 2 <= requests <= len(names):
        raise ValueError(f"requests must be an int from 2 to the number of forget items ({len(names)} in "
                         f"{split.name}); got {requests!r}.")
    folds = [list(f) for f in np.array_split(np.asarray(names, dtype=object), requests)]
    task = lm_task(run.lm(), split)
    retained = _retain_sample(world, split)
    kept_world = _only(world, subjects=[s_ for s_ in world.subjects if s_ not in set(split.subjects)])
    folder = Path(out or Path(run.path) / "unlearn") / split.name / f"sequential_{requests}"
    from ..validate import mark_output
    mark_output(folder.parent.parent, "unlearn")

    def evaluate(model, i: int) -> dict:
        lm = LM(model, task.lm.tokenizer, task.lm.prepend_bos, name=task.lm.name)
        done = [x for f in folds[:i] for x in f]
        pending = [x for f in folds[i:] for x in f]
        subj = [x for x in done if x in set(split.subjects)]
        texts = list(dict.fromkeys(split.texts[j] for j in split.forget if split.info.subject.iloc[j] in set(done)))
        return {"request": i, "n_items": len(done),
                "forget_exact": _forget_exact(lm, split, world, done) if done else np.nan,
                "verbmem_forget": float(verbatim_memorization(lm, texts).rouge.mean()) if texts else np.nan,
                "knowmem_forget": (float(knowledge_memorization(lm, _only(world, subjects=subj)).rouge.mean())
                                   if subj else np.nan),
                "pending_exact": _forget_exact(lm, split, world, pending) if pending else np.nan,
                "recall_train": float(_recall_train(lm, kept_world)),
                "knowmem_retain": float(knowledge_memorization(lm, _only(world, subjects=retained)).rouge.mean())}

    base = {"run": str(run.path), "forget": split.name, "requests": requests, "folds": folds, "seed": seed,
            "n_retain": int(len(split.retain)), "knowmem_retain_subjects": retained,
            "sustainability": "MUSE: requests unlearned one after another, each from the previous model"}
    original = run.model()
    start = evaluate(original, 0)
    tables = []
    for m in tqdm(methods, desc="sequential unlearning", disable=not progress):
        settings = {**base, "method": m, "params": effective[m]}
        path = folder / f"{m}.parquet"
        if path.exists():
            old = load_result(path)
            if {k: old.attrs["settings"].get(k) for k in ("params", "seed", "folds")} == json.loads(json.dumps(
                    {k: settings[k] for k in ("params", "seed", "folds")})):
                tables.append(old)
                continue
        model, rows = original, [{"method": m, **start, "seconds": 0.0}]
        for i, fold in enumerate(folds, 1):
            ids = [j for j in split.forget if split.info.subject.iloc[j] in set(fold)]
            model, rec = unlearn(model, task, ids, split.retain, m, seed=seed + i, progress=False,
                                 **params.get(m, {}))
            rows.append({"method": m, **evaluate(model, i), "seconds": rec["seconds"]})
        df = make_result(pd.DataFrame(rows)[SEQUENTIAL_COLUMNS], **settings)
        save_result(df, path)
        tables.append(df)
    table = make_result(pd.concat(tables, ignore_index=True)[SEQUENTIAL_COLUMNS], **base, methods=methods,
                        params=effective)
    save_result(table, folder / "table.parquet")
    from ..analyses.plots import save_figure
    save_figure(plot_sequential_unlearning(table), folder / "sequential.png")
    return table


def _recall_train(lm, world: FactWorld) -> float:
    from ..analyses.lm import fact_recall
    return float(fact_recall(lm, world, "train").correct.mean())


def plot_sequential_unlearning(table: pd.DataFrame):
    """Forgetting and utility against the number of unlearning requests, one line per method
    (:func:`sequential_lm_unlearning`)."""
    import matplotlib.pyplot as plt

    s = table.attrs.get("settings", {})
    cols = [("forget_exact", "requested items: exact (lower = forgotten)"),
            ("verbmem_forget", "requested items: VerbMem (ROUGE-L F1)"),
            ("pending_exact", "items not yet requested: exact"),
            ("recall_train", "retained facts: recall (utility)"),
            ("knowmem_retain", "retained facts: KnowMem (MUSE utility)")]
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.6), constrained_layout=True)
    for ax, (c, label) in zip(axes, cols):
        for m, g in table.groupby("method", sort=False):
            ax.plot(g.request, g[c], marker="o", label=m)
        ax.set(xlabel="unlearning requests so far", title=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Sequential unlearning of {s.get('forget', '?')} in {s.get('requests', '?')} requests "
                 f"(method seed {s.get('seed', '?')} + request; request 0 = the original model)", fontsize=9)
    return fig
