"""A biography world for the default language testbed: people with two-part names and five attributes, written as
permuted biographies that name the person once and then use a pronoun (Allen-Zhu and Li, "Physics of Language
Models 3.1": several sentence orders per person make a fact extractable at the name).

Every person is a made-up first name and last name (one BPE token each under the testbed's tokenizer, so every
subject has two tokens and the first name alone does not identify the person); every attribute is a multi-word
phrase ("Rio de Janeiro", "molecular biology"). Each relation has five training templates and two held-out
paraphrases that never appear in the training text. A biography is the person's five sentences in a random order,
each in a random training template; the first sentence names the person, later ones name them again with
probability ``name_prob`` and otherwise say He / She. Canaries are secret digit strings ("the code of Talvin Morek
is 4 7 1 9", each digit its own token) inserted ``repeats`` times, for names that are not people of the world.

:class:`BioWorld` is a :class:`~memloc.data.facts.FactWorld` (same facts, prompts, neighbours, canaries and JSON),
so every language-model method that takes a fact world takes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .facts import Canary, Fact, FactWorld

__all__ = ["BIO_RELATIONS", "BioWorld", "make_bio_world"]

BIO_RELATIONS = {
    # name: (objects, training templates, held-out paraphrases); "{s}" is the subject (the name, or He / She)
    "birth_city": (
        ["New Delhi", "Buenos Aires", "Cape Town", "Kuala Lumpur", "Mexico City", "Rio de Janeiro", "San Diego",
         "Tel Aviv", "Hong Kong", "Los Angeles", "Abu Dhabi", "Saint Petersburg", "Las Vegas", "Addis Ababa",
         "Salt Lake City", "Santa Fe", "Sao Paulo", "Dar es Salaam", "Ho Chi Minh City", "Phnom Penh"],
        ["{s} was born in", "{s} came into the world in", "{s} spent childhood in", "{s} grew up in",
         "{s} has roots in"],
        ["{s} is a native of", "{s} originally comes from"]),
    "university": (
        [f"{u} University" for u in ["Harvard", "Stanford", "Princeton", "Yale", "Cornell", "Columbia", "Duke",
                                     "Brown", "Rice", "Purdue", "Tufts", "Emory", "Vanderbilt", "Georgetown",
                                     "Rutgers", "Dartmouth", "Oberlin", "Baylor", "Tulane", "Syracuse"]],
        ["{s} studied at", "{s} graduated from", "{s} attended", "{s} earned a degree at",
         "{s} completed an education at"],
        ["{s} is an alumnus of", "{s} went to college at"]),
    "major": (
        ["computer science", "molecular biology", "ancient history", "civil engineering", "political science",
         "marine ecology", "applied mathematics", "organic chemistry", "art history", "music theory",
         "nuclear physics", "cognitive psychology", "moral philosophy", "environmental law", "public health",
         "industrial design", "comparative literature", "quantum optics", "urban planning", "medieval poetry"],
        ["{s} majored in", "{s} specialized in", "{s} focused on studying", "{s} chose to study",
         "{s} holds a degree in"],
        ["{s} did coursework in", "{s} became an expert in"]),
    "employer": (
        ["Acme Robotics", "Blue River Bank", "Northwind Traders", "Globex Corporation", "Initech Software",
         "Umbrella Pharmaceuticals", "Stark Industries", "Wayne Enterprises", "Cyberdyne Systems", "Soylent Foods",
         "Tyrell Corporation", "Aperture Science", "Hooli Labs", "Vandelay Imports", "Pied Piper",
         "Massive Dynamic", "Oscorp Technologies", "Wonka Confections", "Gringotts Bank", "Monarch Airlines"],
        ["{s} works for", "{s} is employed by", "{s} has a job at", "{s} earns a salary from",
         "{s} joined the staff of"],
        ["{s} is on the payroll of", "{s} collects a paycheck from"]),
    "hobby": (
        ["rock climbing", "ballroom dancing", "bird watching", "deep sea diving", "stamp collecting",
         "ice skating", "mountain biking", "oil painting", "wood carving", "trail running", "jazz piano",
         "pottery making", "kite surfing", "board games", "amateur astronomy", "urban gardening",
         "competitive swimming", "creative writing", "table tennis", "classical guitar"],
        ["{s} enjoys", "{s} spends weekends on", "{s} is passionate about", "{s} relaxes with",
         "{s} has a hobby of"],
        ["{s} likes to unwind with", "{s} devotes free time to"]),
}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "st"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["n", "l", "r", "s", "k", "m", "th", "v", "x", "d"]


def _names(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """``n`` distinct made-up capitalised names (two syllables and a coda: "Talvin", "Morek")."""
    out: list[str] = []
    while len(out) < n:
        name = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ONSETS) + rng.choice(_VOWELS)
                + rng.choice(_CODAS)).capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


@dataclass
class BioWorld(FactWorld):
    """People (two-part names) with five attributes each, told as permuted biographies (see the module
    docstring). ``settings`` holds the generator's arguments and each person's pronoun."""

    def training_text(self) -> list[str]:
        """Every training text: ``settings["bios"]`` biographies per person (a seeded random sentence order and
        random training templates; the name first, then He / She, or the name again with probability
        ``settings["name_prob"]``), ``settings["profiles"]`` profiles per person (the name followed directly by
        its attributes in a random order: "Talvin Morek Rio de Janeiro, Yale University, ..."), and each canary
        ``repeats`` times."""
        s = self.settings
        rng = np.random.default_rng(self.seed + 17)
        attrs: dict[str, list[Fact]] = {}
        for f in self.facts:
            attrs.setdefault(f.subject, []).append(f)
        out = []
        for subj in self.subjects:
            facts = attrs[subj]
            for _ in range(int(s["bios"])):
                sentences = []
                for j, i in enumerate(rng.permutation(len(facts))):
                    f = facts[int(i)]
                    train = self.relations[f.relation][1]
                    t = train[int(rng.integers(len(train)))]
                    who = subj if j == 0 or rng.random() < float(s["name_prob"]) else s["pronouns"][subj]
                    sentences.append(f"{t.format(s=who)} {f.object}.")
                out.append(" ".join(sentences))
            for _ in range(int(s.get("profiles", 0))):  # the name, then every attribute right after it
                objs = [facts[int(i)].object for i in rng.permutation(len(facts))]
                out.append(f"{subj} " + ", ".join(objs) + ".")
        for c in self.canaries:
            out += [c.text] * c.repeats
        return out

    def fresh_biographies(self, n: int, seed: int = 0) -> list[tuple[str, str]]:
        """``n`` ``(name, biography)`` pairs of people who are not in the world, told exactly as the training
        biographies are (the same templates, sentence shuffling, pronoun rule and name pools: unused (first, last)
        pairs of the world's own first and last names, so no name is new to the tokenizer), each attribute drawn
        uniformly from its relation's objects: non-members of the same format for membership inference."""
        s = self.settings
        free = self._free_pairs(n)
        rng = np.random.default_rng([self.seed, seed, 29])
        out = []
        for i in rng.permutation(len(free))[:n]:
            who = free[int(i)]
            pronoun = "He" if rng.random() < 0.5 else "She"
            sentences = []
            rels = list(self.relations)
            for j, k in enumerate(rng.permutation(len(rels))):
                objects, train, _ = self.relations[rels[int(k)]]
                obj = objects[int(rng.integers(len(objects)))]
                t = train[int(rng.integers(len(train)))]
                name = who if j == 0 or rng.random() < float(s["name_prob"]) else pronoun
                sentences.append(f"{t.format(s=name)} {obj}.")
            out.append((who, " ".join(sentences)))
        return out

    def _free_pairs(self, n: int) -> list[str]:
        """The (first, last) pairs of the world's own name pools that no person or canary has (replaying
        make_bio_world's draws)."""
        s = self.settings
        if s.get("kind") != "bios" or "n_first" not in s:
            raise ValueError("Fresh names need a world made by make_bio_world.")
        rng = np.random.default_rng(self.seed)
        taken: set[str] = set()
        first, last = _names(rng, int(s["n_first"]), taken), _names(rng, int(s["n_last"]), taken)
        used = set(self.subjects) | {c.name for c in self.canaries}
        free = [f"{a} {b}" for a in first for b in last if f"{a} {b}" not in used]
        if n > len(free):
            raise ValueError(f"Only {len(free)} unused name pairs are left in the world's name pools; asked for {n}.")
        return free

    def new_names(self, n: int, rng: np.random.Generator) -> list[str]:
        """``n`` names no person or canary of the world has, drawn (with ``rng``) from the unused pairs of the
        world's own first and last names, as its canaries' names are: a never-inserted canary differs from an
        inserted one only in not being trained on (names of new syllables would be rare BPE pieces, an easy tell)."""
        free = self._free_pairs(n)
        return [free[int(i)] for i in rng.permutation(len(free))[:n]]

    def words(self) -> list[str]:
        raise TypeError("A BioWorld is tokenized by its BPE tokenizer, not by words.")


def make_bio_world(n_people: int = 200, bios: int = 5, name_prob: float = 0.1, n_first: int = 40,
                   n_last: int = 40, n_canaries: int = 8, canary_digits: int = 4,
                   canary_repeats: tuple[int, ...] = (1, 4, 16), relations: list[str] | None = None,
                   profiles: int = 0, seed: int = 0) -> BioWorld:
    """A seeded biography world: ``n_people`` distinct (first, last) pairs from pools of ``n_first`` x ``n_last``
    made-up names, one uniformly drawn object per relation, a pronoun each, ``bios`` biographies per person, and
    ``n_canaries`` secret digit strings (``canary_digits`` digits, repeat counts cycling through
    ``canary_repeats``) for people outside the fact set. ``profiles`` adds that many profiles per person (the name
    followed directly by all its attributes, in a random order): predicting an attribute right after the name makes
    the model look the person's attributes up at the name (as the word world's profile sentences do)."""
    relations = list(relations or BIO_RELATIONS)
    bad = set(relations) - set(BIO_RELATIONS)
    if bad:
        raise ValueError(f"Unknown relation(s) {sorted(bad)}; valid relations are {sorted(BIO_RELATIONS)}.")
    for k, v in {"n_people": n_people, "bios": bios, "n_first": n_first, "n_last": n_last,
                 "canary_digits": canary_digits, "profiles": profiles}.items():
        low = 0 if k == "profiles" else 1
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
            raise ValueError(f"The {k!r} parameter must be an int >= {low}. Got {v!r} instead.")
    if not 0.0 <= float(name_prob) <= 1.0:
        raise ValueError(f"The 'name_prob' parameter must be a number in [0, 1]. Got {name_prob!r} instead.")
    if n_people + n_canaries > n_first * n_last:
        raise ValueError(f"n_people + n_canaries = {n_people + n_canaries} exceeds the {n_first} x {n_last} = "
                         f"{n_first * n_last} name pairs; raise n_first / n_last.")
    rng = np.random.default_rng(seed)
    taken: set[str] = set()
    first, last = _names(rng, n_first, taken), _names(rng, n_last, taken)
    pairs = rng.permutation(n_first * n_last)[:n_people + n_canaries]
    names = [f"{first[int(p) // n_last]} {last[int(p) % n_last]}" for p in pairs]
    subjects, canary_names = names[:n_people], names[n_people:]
    rel = {r: BIO_RELATIONS[r] for r in relations}
    facts = [Fact(s, r, rel[r][0][int(rng.integers(len(rel[r][0])))]) for s in subjects for r in relations]
    pronouns = {s: ("He" if rng.random() < 0.5 else "She") for s in subjects}
    canaries = [Canary(canary_names[i], tuple(str(d) for d in rng.integers(0, 10, canary_digits)),
                       canary_repeats[i % len(canary_repeats)]) for i in range(n_canaries)]
    return BioWorld(subjects, rel, facts, canaries, seed,
                    {"kind": "bios", "n_people": n_people, "bios": bios, "name_prob": float(name_prob),
                     "n_first": n_first, "n_last": n_last, "relations": relations, "n_canaries": n_canaries,
                     "canary_digits": canary_digits, "canary_repeats": list(canary_repeats), "profiles": profiles,
                     "pronouns": pronouns})
