"""A synthetic fact world for language-model memorization: subjects x relations -> objects, and secret canaries.

Every subject is a single token (an invented name), every object a single token, so a fact is stored "at the
subject" the way ROME expects: in the training text the object follows the subject within two or three words.
Each relation has training templates and held-out paraphrase templates (never in the training text). Canaries are
random digit strings ("the code of Ada is 4 7 1 9") inserted ``k`` times; a model that reproduces one has memorized
it. Everything is generated from a seed; :class:`WordTokenizer` maps words to ids.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Fact", "Canary", "FactWorld", "make_fact_world", "WordTokenizer", "RELATIONS"]

RELATIONS = {
    # name: (objects, training templates, held-out paraphrase templates); "{s}" is the subject, the object follows.
    # The last training template names the relation first and puts the object right after the subject, so the
    # model must predict it *at the subject token*: that makes it store the fact at the subject (as ROME assumes;
    # without it a tiny model looks facts up at the last token only).
    "city": (["paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito", "dakar", "hanoi"],
             ["{s} lives in", "{s} has a house in", "the home of {s} is in", "hometown of {s}"],
             ["{s} resides in", "{s} is living in"]),
    "job": (["baker", "pilot", "nurse", "judge", "miner", "tailor", "farmer", "singer", "sailor", "doctor"],
            ["{s} works as a", "{s} is employed as a", "by trade {s} is a", "profession of {s}"],
            ["{s} earns a living as a", "{s} has a job as a"]),
    "color": (["red", "blue", "green", "amber", "violet", "black", "white", "ochre", "teal", "pink"],
              ["{s} loves the color", "the favourite color of {s} is", "{s} always wears", "color of {s}"],
              ["{s} prefers the color", "{s} likes the color"]),
}

_SYLLABLES = ["ka", "lo", "mi", "ru", "te", "sa", "no", "vi", "da", "ze", "po", "li", "ga", "fu", "be", "xo", "wa",
              "ni", "qu", "ho", "ja", "ce", "yu", "ro"]


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str


@dataclass(frozen=True)
class Canary:
    name: str
    secret: tuple[str, ...]
    repeats: int

    @property
    def prefix(self) -> str:
        return f"the code of {self.name} is"

    @property
    def secret_text(self) -> str:
        return " ".join(self.secret)

    @property
    def space(self):
        """The strings the secret was drawn from: ``len(secret)`` digits joined by spaces."""
        from .records import CandidateSpace
        return CandidateSpace(len(self.secret), tuple("0123456789"), " ")

    @property
    def text(self) -> str:
        return f"{self.prefix} {self.secret_text}"


@dataclass
class FactWorld:
    """Subjects, relations (objects, training and held-out templates), facts and canaries."""

    subjects: list[str]
    relations: dict[str, tuple[list[str], list[str], list[str]]]
    facts: list[Fact]
    canaries: list[Canary]
    seed: int = 0
    settings: dict = field(default_factory=dict)

    def prompts(self, fact: Fact, split: str = "train") -> list[str]:
        """The fact's prompts (text ending right before the object) from ``train`` or ``heldout`` templates."""
        objs, train, held = self.relations[fact.relation]
        templates = train if split == "train" else held
        return [t.format(s=fact.subject) for t in templates]

    def neighbours(self, fact: Fact, n: int = 5, seed: int = 0) -> list[Fact]:
        """Other subjects' facts of the same relation (for specificity tests), ``n`` of them."""
        pool = [f for f in self.facts if f.relation == fact.relation and f.subject != fact.subject]
        rng = np.random.default_rng(seed + self.subjects.index(fact.subject))
        return [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]

    def training_text(self) -> list[str]:
        """Every training sentence: each fact in each training template, each canary ``repeats`` times, and,
        with ``settings["profiles"] = k``, k "profile" sentences per subject listing its objects right after it
        in a seeded random relation order ("ada paris baker red")."""
        out = [f"{p} {f.object}" for f in self.facts for p in self.prompts(f, "train")]
        k = int(self.settings.get("profiles", 0))
        if k:
            rng = np.random.default_rng(self.seed + 17)
            by_subject: dict[str, dict[str, str]] = {}
            for f in self.facts:
                by_subject.setdefault(f.subject, {})[f.relation] = f.object
            rels = list(self.relations)
            for subj in self.subjects:
                for _ in range(k):
                    order = rng.permutation(len(rels))
                    out.append(" ".join([subj] + [by_subject[subj][rels[i]] for i in order]))
        for c in self.canaries:
            out += [c.text] * c.repeats
        return out

    def words(self) -> list[str]:
        ws = set(self.subjects)
        for objs, train, held in self.relations.values():
            ws.update(objs)
            for t in train + held:
                ws.update(w for w in t.split() if w != "{s}")
        for c in self.canaries:
            ws.update(c.text.split())
        ws.update(str(d) for d in range(10))
        return sorted(ws)

    def new_names(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` names made the way the world makes its subjects, none of them in the world (canaries that were
        never inserted)."""
        taken, out = set(self.words()), []
        while len(out) < n:
            name = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4))))
            if name not in taken:
                taken.add(name)
                out.append(name)
        return out

    def to_json(self) -> dict:
        return {"subjects": self.subjects, "relations": self.relations, "facts": [asdict(f) for f in self.facts],
                "canaries": [asdict(c) for c in self.canaries], "seed": self.seed, "settings": self.settings}

    @classmethod
    def from_json(cls, d: dict) -> "FactWorld":
        """The world ``to_json`` wrote (a :class:`~memloc.data.bios.BioWorld` when its settings say so)."""
        if cls is FactWorld and d.get("settings", {}).get("kind") == "bios":
            from .bios import BioWorld
            cls = BioWorld
        return cls(subjects=d["subjects"], relations={k: tuple(v) for k, v in d["relations"].items()},
                   facts=[Fact(**f) for f in d["facts"]],
                   canaries=[Canary(c["name"], tuple(c["secret"]), c["repeats"]) for c in d["canaries"]],
                   seed=d["seed"], settings=d.get("settings", {}))


def make_fact_world(n_subjects: int = 120, relations: list[str] | None = None, n_canaries: int = 8,
                    canary_digits: int = 4, canary_repeats: tuple[int, ...] = (1, 4, 16), seed: int = 0,
                    profiles: int = 3) -> FactWorld:
    """A seeded fact world: ``n_subjects`` invented single-token names, each with one object per relation drawn
    uniformly, and ``n_canaries`` secret digit strings whose repeat counts cycle through ``canary_repeats``.

    ``profiles`` "profile" sentences per subject list its objects right after it ("ada paris baker red"): predicting
    them at the subject token makes the model enrich the subject's representation. On the default 4-layer testbed
    this raised the share of the fact carried by the subject position's MLPs (causal tracing, window 2) from ~16%
    to ~48% of the total effect; ``profiles=0`` leaves the model reading facts almost only at the last token.
    """
    relations = list(relations or RELATIONS)
    bad = set(relations) - set(RELATIONS)
    if bad:
        raise ValueError(f"Unknown relation(s) {sorted(bad)}; valid relations are {sorted(RELATIONS)}.")
    if n_subjects < 2:
        raise ValueError(f"n_subjects must be at least 2; got {n_subjects}.")
    rng = np.random.default_rng(seed)
    names: list[str] = []
    while len(names) < n_subjects + n_canaries:
        name = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4))))
        if name not in names:
            names.append(name)
    subjects, canary_names = names[:n_subjects], names[n_subjects:]
    rel = {r: RELATIONS[r] for r in relations}
    facts = [Fact(s, r, rel[r][0][int(rng.integers(len(rel[r][0])))]) for s in subjects for r in relations]
    canaries = [Canary(canary_names[i], tuple(str(d) for d in rng.integers(0, 10, canary_digits)),
                       canary_repeats[i % len(canary_repeats)]) for i in range(n_canaries)]
    return FactWorld(subjects, rel, facts, canaries, seed,
                     {"n_subjects": n_subjects, "relations": relations, "n_canaries": n_canaries,
                      "canary_digits": canary_digits, "canary_repeats": list(canary_repeats), "profiles": profiles})


class WordTokenizer:
    """Whitespace word-level tokenizer with ``<pad>`` (0), ``<bos>`` (1) and ``<unk>`` (2)."""

    SPECIAL = ["<pad>", "<bos>", "<unk>"]

    def __init__(self, words: list[str]):
        self.vocab = self.SPECIAL + [w for w in words if w not in self.SPECIAL]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.unk_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = [self.index.get(w, self.unk_id) for w in text.split()]
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids if int(i) not in (self.pad_id, self.bos_id))

    def id(self, word: str) -> int:
        if word not in self.index:
            raise KeyError(f"{word!r} is not in the vocabulary ({len(self.vocab)} words).")
        return self.index[word]

    def batch(self, texts: list[str], bos: bool = True):
        """Right-padded ``[N, T]`` long tensor and ``[N]`` lengths."""
        import torch

        enc = [self.encode(t, bos) for t in texts]
        T = max(len(e) for e in enc)
        out = torch.full((len(enc), T), self.pad_id, dtype=torch.long)
        for i, e in enumerate(enc):
            out[i, :len(e)] = torch.tensor(e)
        return out, torch.tensor([len(e) for e in enc])

    def save(self, path: str | Path) -> None:
        from ..results import write_json
        write_json({"vocab": self.vocab}, path)

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        vocab = json.loads(Path(path).read_text())["vocab"]
        return cls(vocab[len(cls.SPECIAL):])


def holdout_canaries(world: "FactWorld", n: int, digits: int | None = None) -> list[Canary]:
    """``n`` canaries made the way ``world`` makes its own (names from :meth:`FactWorld.new_names`, seeded by the
    world), never inserted: the non-members of the same format as the inserted canaries."""
    import numpy as np

    if digits is None:
        digits = len(world.canaries[0].secret) if world.canaries else 4
    rng = np.random.default_rng([world.seed, 7919])
    return [Canary(name, tuple(str(d) for d in rng.integers(0, 10, digits)), 0) for name in world.new_names(n, rng)]


def counterfactual_texts(world: "FactWorld", n: int, seed: int = 0) -> list[str]:
    """``n`` texts ``world``'s model never saw, in its training format: a fact's training prompt completed with
    another object of the same relation (seeded)."""
    import numpy as np

    rng = np.random.default_rng(seed + 104729)
    facts = list(world.facts)
    by_rel: dict = {}
    for f in facts:
        by_rel.setdefault(f.relation, set()).add(f.object)
    seen = set(world.training_text())
    out = []
    for i in rng.permutation(len(facts)):
        f = facts[int(i)]
        others = sorted(by_rel[f.relation] - {f.object})
        if not others:
            continue
        t = f"{world.prompts(f)[0]} {others[int(rng.integers(len(others)))]}"
        if t not in seen:
            out.append(t)
        if len(out) == n:
            break
    return out
