"""Plain records for language-model work, and the loaders that produce them from the files users have.

- :class:`EditRecord`: one edit request with its evaluation prompts. :func:`load_counterfact` reads CounterFact
  JSON (``requested_rewrite`` with ``prompt``/``subject``/``target_new``/``target_true``, ``paraphrase_prompts``,
  ``neighborhood_prompts``, ``attribute_prompts``, ``generation_prompts``); :func:`load_zsre` reads zsRE JSON
  (``src``, ``subject``, ``alt``, ``answers``, ``rephrase``, ``loc``, ``loc_ans``); :func:`load_requests` tells
  them apart. A malformed record is an error that names the record and the missing field.
- :class:`Secret` and :class:`CandidateSpace`: a secret inserted into training text (a canary) and the space of
  strings it was drawn from, for exposure (Carlini et al. 2019) of any tokenization.
- :func:`load_texts`: texts for memorized-sequence detection from a list, a ``.txt`` file (one text a line), a
  ``.jsonl`` file (a ``text`` field) or a ``datasets`` folder saved with ``save_to_disk``.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

__all__ = ["EditRecord", "load_counterfact", "load_zsre", "load_requests", "Secret", "CandidateSpace",
           "load_texts"]


# ----------------------------------------------------------------------------------------------- edit records

@dataclass(frozen=True)
class EditRecord:
    """One edit: ``prompt`` (with ``{}`` where the subject goes) ``-> target_new`` (``target_true`` is the current
    answer, if known), and the prompts that evaluate it.

    ``paraphrase_prompts``: the same fact in other words (generalization). ``neighborhood_prompts`` with
    ``neighborhood_targets`` (CounterFact: other subjects sharing ``target_true``; zsRE: an unrelated question
    ``loc`` with answer ``loc_ans``): must not change. ``attribute_prompts``: subjects that truly have
    ``target_new`` (CounterFact). ``generation_prompts``: for fluency (generation entropy) and consistency.
    ``reference_texts``: texts about ``target_new`` for consistency (TF-IDF), when a file has them.
    ``other_prompts`` / ``other_targets``: the subject's other facts (memloc's testbed adds them).
    ``format``: ``counterfact``, ``zsre`` or ``memloc``; ``case_id``: the record's id in its file.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_targets: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    reference_texts: tuple[str, ...] = ()
    other_prompts: tuple[str, ...] = ()
    other_targets: tuple[str, ...] = ()
    format: str = "memloc"
    case_id: Any = None
    relation: str | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str) or self.prompt.count("{}") != 1:
            raise ValueError(f"Record {self.case_id!r}: the prompt must contain '{{}}' once, where the subject goes; "
                             f"got {self.prompt!r}.")
        if len(self.neighborhood_targets) not in (0, len(self.neighborhood_prompts)):
            raise ValueError(f"Record {self.case_id!r}: {len(self.neighborhood_prompts)} neighborhood prompts but "
                             f"{len(self.neighborhood_targets)} targets.")
        if len(self.other_targets) != len(self.other_prompts):
            raise ValueError(f"Record {self.case_id!r}: other_prompts and other_targets differ in length.")

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def request(self):
        """The :class:`~memloc.edit.rome.Request` of this record."""
        from ..edit.rome import Request
        return Request(self.prompt, self.subject, self.target_new, self.target_true)


def _read_json_records(path: str | Path, what: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {what} file at {path}.")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:  # JSON lines
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is neither JSON nor JSON lines: {e}.") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} must hold a list of {what} records (JSON objects).")
    if not data:
        raise ValueError(f"{path} holds no {what} records.")
    return data


def _need(rec: dict, key: str, where: str, kind=None):
    if key not in rec:
        raise ValueError(f"{where} lacks the field {key!r} (it has {sorted(rec)[:12]}).")
    v = rec[key]
    if kind is not None and not isinstance(v, kind):
        raise ValueError(f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)}; got {type(v).__name__}.")
    return v


def _strs(rec: dict, key: str, where: str) -> tuple[str, ...]:
    v = rec.get(key, [])
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"{where}: field {key!r} must be a list of strings.")
    return tuple(v)


def _target_str(v, where: str, key: str) -> str:
    if isinstance(v, dict):
        if "str" not in v:
            raise ValueError(f"{where}: field {key!r} must have a 'str' entry (CounterFact: {{\"str\": ..., \"id\": ...}}).")
        v = v["str"]
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string.")
    return v


def load_counterfact(path: str | Path, limit: int | None = None) -> list[EditRecord]:
    """CounterFact records (kmeng01/rome's ``counterfact.json`` format) from a local file."""
    out = []
    for i, rec in enumerate(_read_json_records(path, "CounterFact")):
        where = f"CounterFact record {i} (case_id {rec.get('case_id', '?')}) in {path}"
        rr = _need(rec, "requested_rewrite", where, dict)
        w2 = where + ", requested_rewrite"
        prompt = _need(rr, "prompt", w2, str)
        subject = _need(rr, "subject", w2, str)
        new = _target_str(_need(rr, "target_new", w2), w2, "target_new")
        true = _target_str(_need(rr, "target_true", w2), w2, "target_true")
        neigh = _strs(rec, "neighborhood_prompts", where)
        out.append(EditRecord(prompt=prompt, subject=subject, target_new=new, target_true=true,
                              paraphrase_prompts=_strs(rec, "paraphrase_prompts", where),
                              neighborhood_prompts=neigh, neighborhood_targets=tuple([true] * len(neigh)),
                              attribute_prompts=_strs(rec, "attribute_prompts", where),
                              generation_prompts=_strs(rec, "generation_prompts", where),
                              reference_texts=_strs(rec, "reference_texts", where), format="counterfact",
                              case_id=rec.get("case_id", i), relation=rr.get("relation_id")))
        if limit and len(out) >= limit:
            break
    return out


def load_zsre(path: str | Path, limit: int | None = None) -> list[EditRecord]:
    """zsRE records (the MEND / ROME ``zsre_mend_eval.json`` format: ``src, subject, alt, answers, rephrase, loc,
    loc_ans``) from a local file. ``src`` must contain the subject; the rewrite prompt is ``src`` with the
    subject replaced by ``{}`` (a question, so the answer follows it)."""
    out = []
    for i, rec in enumerate(_read_json_records(path, "zsRE")):
        where = f"zsRE record {i} (case_id {rec.get('case_id', i)}) in {path}"
        src = _need(rec, "src", where, str)
        subject = _need(rec, "subject", where, str)
        alt = _target_str(_need(rec, "alt", where), where, "alt")
        answers = _need(rec, "answers", where)
        answers = [answers] if isinstance(answers, str) else answers
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: field 'answers' must be a non-empty list of strings.")
        rephrase = _need(rec, "rephrase", where, str)
        loc = _need(rec, "loc", where, str)
        loc_ans = _target_str(_need(rec, "loc_ans", where), where, "loc_ans")
        if subject not in src:
            raise ValueError(f"{where}: the subject {subject!r} does not occur in src {src!r}.")
        loc = loc[len("nq question: "):] if loc.startswith("nq question: ") else loc
        out.append(EditRecord(prompt=src.replace(subject, "{}", 1), subject=subject, target_new=alt,
                              target_true=answers[0], paraphrase_prompts=(rephrase,), neighborhood_prompts=(loc,),
                              neighborhood_targets=(loc_ans,), format="zsre", case_id=rec.get("case_id", i)))
        if limit and len(out) >= limit:
            break
    return out


def load_requests(path: str | Path, limit: int | None = None) -> list[EditRecord]:
    """CounterFact or zsRE records, told apart by their fields."""
    first = _read_json_records(path, "edit request")[0]
    if "requested_rewrite" in first:
        return load_counterfact(path, limit)
    if "src" in first and "alt" in first:
        return load_zsre(path, limit)
    raise ValueError(f"{path}: the first record has fields {sorted(first)[:12]}; expected CounterFact "
                     "('requested_rewrite', ...) or zsRE ('src', 'subject', 'alt', 'answers', 'rephrase', 'loc', "
                     "'loc_ans').")


# ----------------------------------------------------------------------------------------------- secrets

@dataclass(frozen=True)
class CandidateSpace:
    """All strings of ``length`` symbols from ``alphabet`` joined by ``sep``, in lexicographic order
    (``"0000"`` first for 4 digits). The space a secret is drawn from, for exposure."""

    length: int
    alphabet: tuple[str, ...] = tuple("0123456789")
    sep: str = ""

    def __post_init__(self):
        if not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"A candidate space needs a length >= 1; got {self.length!r}.")
        if len(set(self.alphabet)) != len(self.alphabet) or not self.alphabet:
            raise ValueError("A candidate space needs a non-empty alphabet of distinct symbols.")

    @property
    def size(self) -> int:
        return len(self.alphabet) ** self.length

    def string(self, symbols: Sequence[int]) -> str:
        return self.sep.join(self.alphabet[i] for i in symbols)

    def symbols(self, secret: str) -> list[int]:
        """The symbol indices of ``secret`` (an error if it is not in the space)."""
        parts = secret.split(self.sep) if self.sep else list(secret)
        if len(parts) != self.length or any(p not in self.alphabet for p in parts):
            raise ValueError(f"{secret!r} is not a string of {self.length} symbols from {list(self.alphabet)} joined by "
                             f"{self.sep!r}.")
        return [self.alphabet.index(p) for p in parts]

    def index(self, secret: str) -> int:
        """Lexicographic position of ``secret``."""
        idx = 0
        for s in self.symbols(secret):
            idx = idx * len(self.alphabet) + s
        return idx

    def all(self) -> Iterator[str]:
        for t in itertools.product(range(len(self.alphabet)), repeat=self.length):
            yield self.string(t)

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        return [self.string(rng.integers(0, len(self.alphabet), self.length)) for _ in range(n)]


@dataclass(frozen=True)
class Secret:
    """A secret the model may have memorized: ``prefix`` followed by ``secret`` (the text inserted ``repeats``
    times), drawn from ``space``."""

    name: str
    prefix: str
    secret: str
    space: CandidateSpace
    repeats: int | None = None

    def __post_init__(self):
        self.space.symbols(self.secret)

    @property
    def secret_text(self) -> str:
        return self.secret

    @property
    def text(self) -> str:
        return self.prefix + ("" if self.prefix.endswith(" ") else " ") + self.secret


# ----------------------------------------------------------------------------------------------- texts

def load_texts(source, field: str = "text", limit: int | None = None) -> list[str]:
    """Texts from a list of strings, a ``.txt`` file (one text a line, empty lines skipped), a ``.jsonl`` /
    ``.json`` file (each record's ``field``), or a Hugging Face ``datasets`` folder saved with ``save_to_disk``
    (its ``field`` column; a DatasetDict's ``train`` split)."""
    if isinstance(source, (list, tuple)):
        texts = list(source)
    else:
        path = Path(source)
        if path.is_dir():
            try:
                import datasets
            except ImportError:
                raise ValueError(f"{path} is a folder; reading a saved dataset needs the 'datasets' package.") from None
            try:
                ds = datasets.load_from_disk(str(path))
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{path} is not a dataset saved with save_to_disk ({type(e).__name__}: {e}).") from None
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            if field not in ds.column_names:
                raise ValueError(f"The dataset at {path} has no column {field!r}; its columns are {ds.column_names}.")
            texts = list(ds[field])
        elif not path.is_file():
            raise FileNotFoundError(f"No texts at {path} (give a .txt, .jsonl or a saved dataset folder).")
        elif path.suffix in (".jsonl", ".json"):
            texts = []
            for i, rec in enumerate(_read_json_records(path, "text")):
                if field not in rec:
                    raise ValueError(f"Record {i} of {path} has no field {field!r} (it has {sorted(rec)[:8]}).")
                texts.append(rec[field])
        else:
            texts = [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"Text {bad[0]} is a {type(texts[bad[0]]).__name__}, not a string.")
    if not texts:
        raise ValueError("No texts given.")
    return texts[:limit] if limit else texts
