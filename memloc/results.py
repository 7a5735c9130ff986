"""The one result format: tidy ``pandas.DataFrame`` objects carrying their settings, written atomically.

A *result* is a DataFrame with documented columns whose ``df.attrs["settings"]`` holds the JSON-able settings
(seed, config, method parameters) that produced it. :func:`save_result` writes it as parquet with the settings
in the file's metadata; :func:`load_result` reads both back. Every write in memloc goes through the atomic
helpers here (temp file in the same folder, fsync, ``os.replace``), so a killed process never leaves a
half-written file behind: either the old file or the new one exists.
"""
from __future__ import annotations

import glob
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

SETTINGS_KEY = b"memloc.settings"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        from .validate import OutputExistsError
        raise OutputExistsError(f"Cannot write {path}: {path.parent} is a file, not a folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing, unreadable or malformed one is an error that names the file."""
    from .validate import InputFileError

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path} {'is a folder, not a file' if path.is_dir() else 'does not exist'} "
                             "(a JSON file was expected).")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputFileError(f"{path} is not valid JSON ({e}); it is corrupt or truncated.") from None


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def make_result(df: pd.DataFrame, **settings: Any) -> pd.DataFrame:
    """Attach ``settings`` (merged with any already there) to ``df.attrs["settings"]`` and return ``df``."""
    merged = dict(df.attrs.get("settings", {}))
    merged.update(settings)
    # round-trip through JSON now, so an unserialisable setting fails at creation, not at save time
    df.attrs["settings"] = json.loads(json.dumps(merged, default=_json_default))
    return df


def save_result(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Atomically write a result as parquet, keeping ``df.attrs["settings"]`` in the file metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[SETTINGS_KEY] = json.dumps(df.attrs.get("settings", {}), default=_json_default).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def load_result(path: str | os.PathLike) -> pd.DataFrame:
    """Read a parquet result written by :func:`save_result`; settings come back in ``df.attrs["settings"]``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .validate import InputFileError

    if not Path(path).is_file():
        raise InputFileError(f"{path} {'is a folder' if Path(path).is_dir() else 'does not exist'} (a parquet "
                             "result was expected).")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise InputFileError(f"{path} is not a readable parquet file ({e}); it is corrupt or truncated.") from None
    df = table.to_pandas()
    meta = table.schema.metadata or {}
    df.attrs["settings"] = json.loads(meta[SETTINGS_KEY]) if SETTINGS_KEY in meta else {}
    return df
