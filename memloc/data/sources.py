"""Datasets memloc ships or reads locally. Nothing here downloads: MNIST-1D is generated, digits ship with
scikit-learn, CIFAR-10 is read from a folder the user provides."""
from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np

from .core import Dataset, from_arrays


_MNIST1D_CACHE: dict[str, dict] = {}  # generation is a slow Python loop; same arguments -> same arrays


def load_mnist1d(num_samples: int = 5000, train_split: float = 0.8, seed: int = 42, **overrides: Any) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated offline with ``mnist1d.data.make_dataset``.

    Args:
        num_samples: total examples (split into train and test by ``train_split``); the package default 5000
            gives the standard 4000/1000 split.
        seed: generation seed; same seed, same data.
        **overrides: any other field of ``mnist1d.data.get_dataset_args()`` (e.g. ``final_seq_length``).
    Returns ``x`` of shape ``[N, 40]`` (one channel, 40 positions). Generated arrays are cached per process. ``make_dataset`` reseeds Python's and
    NumPy's global generators; memloc saves and restores both around it, so callers' random state is untouched.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=True)
    unknown = set(overrides) - set(args)
    if unknown:
        raise ValueError(f"Unknown MNIST-1D argument(s) {sorted(unknown)}; valid ones are {sorted(args)}.")
    from ..validate import number

    number("num_samples", num_samples, lo=20, integer=True)
    number("train_split", train_split, lo=0, hi=1, lo_open=True, hi_open=True)
    number("seed", seed, integer=True)
    args.update(overrides, num_samples=num_samples, train_split=train_split, seed=seed)
    args.pop("url", None)

    key = json.dumps(args, sort_keys=True)
    if key not in _MNIST1D_CACHE:
        ns = SimpleNamespace(**args)  # make_dataset reads attributes
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            _MNIST1D_CACHE[key] = make_dataset(ns)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
    d = _MNIST1D_CACHE[key]
    return from_arrays(d["x"].astype(np.float32), d["y"], d["x_test"].astype(np.float32), d["y_test"],
                       num_classes=10, name="mnist1d", meta={"dataset": "mnist1d", "args": args})


def load_digits(test_fraction: float = 0.2, seed: int = 0, images: bool = False) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 examples), pixels scaled to [0, 1].

    The train/test split is stratified and drawn with ``seed``. ``images=True`` gives ``[N, 1, 8, 8]``
    (for CNNs), otherwise ``[N, 64]``.
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    from ..validate import ConfigError, number

    number("test_fraction", test_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
    number("seed", seed, integer=True)
    if not isinstance(images, bool):
        raise ConfigError(f"The 'images' parameter must be true or false. Got {images!r} instead.")
    d = _load()
    x = (d.data / 16.0).astype(np.float32)
    idx = np.arange(len(x))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=d.target)
    tr, te = np.sort(tr), np.sort(te)
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return from_arrays(x[tr], d.target[tr], x[te], d.target[te], num_classes=10, name="digits",
                       meta={"dataset": "digits", "test_fraction": test_fraction, "seed": seed, "images": images,
                             "source_index": {"train": tr.tolist(), "test": te.tolist()}})


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds the plain containers and numpy arrays of the CIFAR python format."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"Refusing to load {module}.{name} from a CIFAR batch file: "
                                     "only numpy arrays and plain containers are expected there.")


CIFAR_HELP = ("Put the CIFAR-10 python version (the folder 'cifar-10-batches-py' with data_batch_1..5 and "
              "test_batch, from cifar-10-python.tar.gz) there, or set MEMLOC_CIFAR10 to its location. "
              "memloc never downloads it.")


def _cifar_folder(root: str | os.PathLike | None) -> Path:
    root = Path(root if root is not None else os.environ.get("MEMLOC_CIFAR10", "data"))
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "data_batch_1").exists() and (cand / "test_batch").exists():
            return cand
    raise FileNotFoundError(f"No CIFAR-10 batches found in {root} or {root / 'cifar-10-batches-py'}. " + CIFAR_HELP)


def load_cifar10(root: str | os.PathLike | None = None, n_train: int | None = None, n_test: int | None = None,
                 normalize: bool = True) -> Dataset:
    """CIFAR-10 from a local ``cifar-10-batches-py`` folder (the standard python-pickle format).

    Args:
        root: the batches folder or its parent; defaults to ``$MEMLOC_CIFAR10`` or ``./data``.
        n_train, n_test: keep only the first n examples of each split (in file order; ids stay stable).
        normalize: map pixels to ``(x/255 - 0.5) / 0.5`` as in Maini et al.; otherwise ``x/255``.
    Returns ``x`` of shape ``[N, 3, 32, 32]``. Batch files are read with an unpickler that accepts only
    numpy arrays and plain containers.
    """
    from ..validate import number

    number("n_train", n_train, lo=1, integer=True, none_ok=True)
    number("n_test", n_test, lo=1, integer=True, none_ok=True)
    folder = _cifar_folder(root)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}. " + CIFAR_HELP)

    def read(name: str):
        from ..validate import InputFileError

        try:
            with open(folder / name, "rb") as fh:
                d = _ArrayUnpickler(fh, encoding="bytes").load()
            data = np.asarray(d[b"data"], dtype=np.uint8)
            labels = np.asarray(d[b"labels"], dtype=np.int64)
        except Exception as e:  # refused classes, garbage bytes, truncation, wrong containers
            raise InputFileError(f"{folder / name} is not a CIFAR-10 python batch ({type(e).__name__}: {e}). "
                                 + CIFAR_HELP) from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise ValueError(f"{folder / name} is not a CIFAR-10 batch: data has shape {list(data.shape)}, "
                             f"expected [n, 3072] with n labels (got {len(labels)}).")
        return data, labels

    tr = [read(n) for n in names]
    xtr, ytr = np.concatenate([a for a, _ in tr]), np.concatenate([b for _, b in tr])
    xte, yte = read("test_batch")
    if n_train is not None:
        xtr, ytr = xtr[:n_train], ytr[:n_train]
    if n_test is not None:
        xte, yte = xte[:n_test], yte[:n_test]

    def prep(a: np.ndarray) -> np.ndarray:
        x = a.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
        return (x - 0.5) / 0.5 if normalize else x

    return from_arrays(prep(xtr), ytr, prep(xte), yte, num_classes=10, name="cifar10",
                       meta={"dataset": "cifar10", "root": str(folder), "n_train": n_train, "n_test": n_test,
                             "normalize": normalize})


DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist1d": load_mnist1d,
    "digits": load_digits,
    "cifar10": load_cifar10,
}


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Load a dataset by name (``mnist1d``, ``digits``, ``cifar10``) with its keyword arguments."""
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid datasets are {sorted(DATASETS)} "
                         "(or build one from arrays with memloc.data.from_arrays).")
    from ..validate import call_keywords

    call_keywords("dataset_kwargs", DATASETS[name], kwargs, what=f"dataset {name!r}")
    return DATASETS[name](**kwargs)
