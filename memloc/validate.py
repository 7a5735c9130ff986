"""memloc's checks of what a user gives it: one place that says what is valid.

Every configuration value is checked where it enters memloc (an API call, a config field, a command-line flag, a
sweep spec), before anything is trained or written, with a message that names the parameter, says what is valid
and what arrived: "The 'lr' parameter must be a finite number in (0, inf). Got inf instead."

Errors from these checks are :class:`MemlocError` (a ``ValueError``) or a subclass. The command line prints them
as one line (``memloc: error: ...``, exit status 2); any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = ["MemlocError", "ConfigError", "InputFileError", "UnknownKeyError", "OutputExistsError", "number", "choice", "known_keys",
           "call_keywords", "int_list", "positive_ints", "safe_name", "differences", "claim_output"]


class MemlocError(ValueError):
    """Something the user gave memloc (a value, a file, a folder) cannot be used; the message says what is valid."""


class ConfigError(MemlocError):
    """A configuration value (argument, config field, command-line flag, sweep spec entry) is invalid."""


class InputFileError(MemlocError):
    """A file or folder memloc was pointed at is missing, of the wrong kind, corrupt or truncated."""


class UnknownKeyError(MemlocError, KeyError):
    """A name or id that is not there (a layer, an example id); the message lists what is valid."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class OutputExistsError(MemlocError, FileExistsError):
    """An output folder holds something else (results made with other settings, or files memloc did not write)."""


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    left = "(" if lo is None or lo_open else "["
    right = ")" if hi is None or hi_open else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def number(name: str, value: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           hi_open: bool = False, integer: bool = False, none_ok: bool = False) -> Any:
    """``value`` if it is a finite number (an int with ``integer``) within the bounds, else :class:`ConfigError`.

    Bools are not numbers here. ``none_ok`` lets ``None`` through."""
    if value is None and none_ok:
        return value
    kind = "an int" if integer else "a finite number"
    ok = not isinstance(value, bool) and (isinstance(value, int) if integer else isinstance(value, (int, float)))
    if ok and not integer:
        ok = math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        bounds = "" if lo is None and hi is None else f" in {_interval(lo, hi, lo_open, hi_open)}"
        raise ConfigError(f"The {name!r} parameter must be {'None or ' if none_ok else ''}{kind}{bounds}. "
                          f"Got {value!r} instead.")
    return value


def choice(name: str, value: Any, options: Iterable[Any]) -> Any:
    options = list(options)
    if value not in options:
        raise ConfigError(f"The {name!r} parameter must be one of {options}. Got {value!r} instead.")
    return value


def known_keys(name: str, given: Iterable[str], valid: Iterable[str], what: str = "") -> None:
    """Refuse keys of ``given`` that are not in ``valid`` (a typo is an error that lists the valid ones)."""
    valid = sorted(valid)
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in the {name!r} parameter{f' ({what})' if what else ''}; "
                          f"valid keys are {valid}.")


def call_keywords(name: str, fn: Callable, kwargs: dict, skip: Sequence[str] = (), what: str = "") -> None:
    """Refuse keyword arguments that ``fn`` does not take (unless it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [k for k, p in params.items() if k not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    known_keys(name, kwargs, valid, what or getattr(fn, "__name__", ""))


def int_list(name: str, text: str | Sequence[int] | None, lo: int | None = None) -> list[int] | None:
    """``"0,2,5"`` (or a list) -> ``[0, 2, 5]``; ``None`` stays ``None``."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()] if isinstance(text, str) else list(text)
    try:
        out = [int(t) if isinstance(t, str) and re.fullmatch(r"[+-]?\d+", t) else _strict_int(t) for t in items]
    except (TypeError, ValueError):
        out = None
    if not out or (lo is not None and min(out) < lo):
        bound = f" >= {lo}" if lo is not None else ""
        raise ConfigError(f"The {name!r} parameter must be a comma-separated list of ints{bound} (e.g. 0,2,5). "
                          f"Got {text!r} instead.")
    return out


def _strict_int(t: Any) -> int:
    if isinstance(t, bool) or not isinstance(t, int):
        raise TypeError(t)
    return t


def positive_ints(name: str, value: Any, allow_empty: bool = True) -> list[int]:
    """A list of ints >= 1 (layer widths, channel counts)."""
    ok = isinstance(value, (list, tuple)) and (allow_empty or len(value) > 0) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    if not ok:
        raise ConfigError(f"The {name!r} parameter must be a list of ints in [1, inf) (e.g. [256, 256]). "
                          f"Got {value!r} instead.")
    return list(value)


_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}")


def safe_name(name: str, value: Any) -> str:
    """A name that is safe as one file or folder name (no separators, no ``..``, no leading dot)."""
    if not isinstance(value, str) or not _SAFE.fullmatch(value) or ".." in value:
        raise ConfigError(f"The {name!r} parameter must be a plain file name (letters, digits, '.', '_', '-', '+', "
                          f"'=', not starting with '.', no '/' or '..'). Got {value!r} instead.")
    return value


def differences(old: Any, new: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{"dotted.key": (old, new)}`` for every key whose value differs (nested dicts are walked)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for k in sorted(set(old) | set(new), key=str):
            out.update(differences(old.get(k), new.get(k), f"{prefix}{k}."))
        return out
    return {} if old == new else {prefix.rstrip("."): (old, new)}


RECORD = "memloc.json"


def claim_output(out: str | Path, kind: str, settings: dict, overwrite: bool = False,
                 overwrite_hint: bool = True) -> dict[str, tuple]:
    """Make ``out`` an output folder of ``kind`` made with ``settings``, recorded in ``out/memloc.json``.

    A new or empty folder is claimed. A folder that records the same kind and settings is reused (resumed). A folder
    with other settings is refused with the differing keys unless ``overwrite`` (then the differences are returned
    and the new settings recorded: the caller recomputes what depends on them). A non-empty folder that memloc
    did not write, or of another kind, is refused unless ``overwrite``. Returns the differences (``{}`` if none).
    ``overwrite_hint=False`` leaves "or pass overwrite=True (--overwrite)" out of the messages (for callers
    without that option).
    """
    from .results import read_json, write_json

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"The output {out} is a file, not a folder; choose a folder.")
    record = out / RECORD
    hint = ", or pass overwrite=True (--overwrite)" if overwrite_hint else ""
    new = {"kind": kind, "settings": settings}
    new = json.loads(json.dumps(new, default=str))
    diff: dict[str, tuple] = {}
    if record.exists():
        old = read_json(record)
        if old.get("kind") != kind and not overwrite:
            raise OutputExistsError(f"{out} holds a memloc {old.get('kind')} output, not a {kind}; choose another "
                                    "folder.")
        diff = differences(old.get("settings", {}), new["settings"])
        if diff and not overwrite:
            shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise OutputExistsError(f"{out} holds a {kind} made with other settings ({shown}). Choose another "
                                    f"folder{hint} to recompute it.")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} exists, is not empty and was not written by memloc's {kind}; refusing to "
                                f"write into it. Choose another folder{hint}.")
    if diff or not record.exists():
        write_json(new, record)
    return diff


def mark_output(out: str | Path, kind: str) -> None:
    """Record in ``out/memloc.json`` that memloc's ``kind`` writes into ``out`` (created if needed), unless a record
    is there already: the command line then accepts the folder as memloc's own."""
    from .results import write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RECORD).exists():
        write_json({"kind": kind, "settings": {}}, out / RECORD)
