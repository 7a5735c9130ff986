"""The dataset container every memloc function takes: tensors plus stable example ids and groups."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..validate import UnknownKeyError

GROUPS = ("clean", "noisy", "test")


@dataclass(frozen=True)
class Dataset:
    """Examples of a classification task, train and test together, each with a stable integer id.

    Attributes:
        x: ``[N, ...]`` float32 inputs (``[N, features]`` for vectors, ``[N, C, H, W]`` for images).
        y: ``[N]`` int64 *training* labels: after :func:`~memloc.data.inject_label_noise` these are the flipped
            labels for noisy examples; test labels are never flipped.
        original_label: ``[N]`` int64 labels before any noise was injected.
        example_id: ``[N]`` int64 ids; an id follows its example through every table, plot and file.
        split: ``[N]`` numpy array of ``"train"`` / ``"test"``.
        group: ``[N]`` numpy array of ``"clean"`` / ``"noisy"`` / ``"test"``.
        num_classes: K.
        name: dataset name (``"mnist1d"``, ``"digits"``, ``"cifar10"``, ``"arrays"`` ...).
        meta: JSON-able settings that produced the data (generation arguments, noise fraction and seed).
    """

    x: torch.Tensor
    y: torch.Tensor
    original_label: torch.Tensor
    example_id: torch.Tensor
    split: np.ndarray
    group: np.ndarray
    num_classes: int
    name: str = "arrays"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.x)
        for attr in ("y", "original_label", "example_id", "split", "group"):
            if len(getattr(self, attr)) != n:
                raise ValueError(f"Dataset.{attr} has {len(getattr(self, attr))} entries but x has {n} examples.")
        if len(torch.unique(self.example_id)) != n:
            raise ValueError("Dataset.example_id must be unique.")
        bad = set(np.unique(self.group)) - set(GROUPS)
        if bad:
            raise ValueError(f"Unknown group(s) {sorted(bad)}; valid groups are {list(GROUPS)}.")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, mask: np.ndarray | torch.Tensor | list[int]) -> "Dataset":
        """Examples selected by a boolean mask or by positions (not ids; see :meth:`by_ids`)."""
        idx = torch.as_tensor(np.array(mask))
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx, as_tuple=False).flatten()
        idx_np = idx.numpy()
        return replace(
            self,
            x=self.x[idx],
            y=self.y[idx],
            original_label=self.original_label[idx],
            example_id=self.example_id[idx],
            split=self.split[idx_np],
            group=self.group[idx_np],
        )

    def by_ids(self, ids) -> "Dataset":
        """Examples with the given ids, in the given order; an unknown id is an error."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = pd.Series(np.arange(len(self)), index=self.example_id.numpy())
        missing = np.setdiff1d(ids, pos.index.values)
        if len(missing):
            raise UnknownKeyError(f"Unknown example id(s) {missing[:10].tolist()}; ids run from "
                           f"{int(self.example_id.min())} to {int(self.example_id.max())}.")
        return self.subset(pos.loc[ids].values)

    @property
    def train(self) -> "Dataset":
        return self.subset(self.split == "train")

    @property
    def test(self) -> "Dataset":
        return self.subset(self.split == "test")

    def group_mask(self, group: str) -> np.ndarray:
        if group not in GROUPS:
            raise ValueError(f"Unknown group {group!r}; valid groups are {list(GROUPS)}.")
        return self.group == group

    def examples(self) -> pd.DataFrame:
        """One row per example: ``example_id, split, label, original_label, group`` (the ``examples.parquet`` table)."""
        return pd.DataFrame({
            "example_id": self.example_id.numpy(),
            "split": self.split.astype(str),
            "label": self.y.numpy(),
            "original_label": self.original_label.numpy(),
            "group": self.group.astype(str),
        })

    def describe(self) -> str:
        counts = {g: int((self.group == g).sum()) for g in GROUPS}
        return (f"{self.name}: {len(self)} examples of shape {list(self.input_shape)}, {self.num_classes} classes "
                f"({counts['clean']} clean + {counts['noisy']} noisy train, {counts['test']} test)")


def from_arrays(x, y, x_test=None, y_test=None, *, original_label=None, original_label_test=None,
                example_id=None, split=None, num_classes: int | None = None, name: str = "arrays",
                meta: dict | None = None) -> Dataset:
    """Build a :class:`Dataset` from plain arrays or tensors, with your own label-noise record if you have one.

    Args:
        x: ``[N, ...]`` inputs; y: ``[N]`` integer *training* labels in ``[0, K)`` (flipped ones included).
        x_test, y_test: optional ``[M, ...]`` / ``[M]`` test examples, appended after the training ones.
        original_label: ``[N]`` labels before you flipped some: examples whose ``y`` differs from it are the
            ``noisy`` group (memorized by construction); the others are ``clean``. Default: ``y`` (no noise).
        original_label_test: the same for the test examples (default ``y_test``); test labels must not be
            flipped.
        example_id: ``[N (+ M)]`` unique non-negative integer ids (your dataset indices), default ``0..N+M-1``.
        split: ``[N]`` of ``"train"`` / ``"test"`` when train and test are mixed in ``x`` (instead of
            ``x_test``).
        num_classes: K; inferred as ``max(label) + 1`` when omitted.
    ``meta`` records how many labels were flipped (``meta["noise"]``) when ``original_label`` is given.
    """
    def arr(v, what):
        t = torch.as_tensor(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v))
        if t.dtype.is_floating_point and what != "x":
            if not torch.equal(t, t.round()):
                raise ValueError(f"{what} must hold integers; got non-integer values such as {t[t != t.round()][:3].tolist()}.")
        return t

    if (x_test is None) != (y_test is None):
        raise ValueError("Give both x_test and y_test, or neither.")
    if split is not None and x_test is not None:
        raise ValueError("Give either split= (train and test mixed in x) or x_test/y_test, not both.")
    xs = [arr(x, "x").float()]
    ys = [arr(y, "y").long().reshape(-1)]
    origs = [ys[0] if original_label is None else arr(original_label, "original_label").long().reshape(-1)]
    if x_test is not None:
        xs.append(arr(x_test, "x").float())
        ys.append(arr(y_test, "y_test").long().reshape(-1))
        origs.append(ys[1] if original_label_test is None else
                     arr(original_label_test, "original_label_test").long().reshape(-1))
    elif original_label_test is not None:
        raise ValueError("original_label_test was given without x_test/y_test.")
    for xi, yi, oi, what in zip(xs, ys, origs, ("", "_test")):
        if len(xi) != len(yi):
            raise ValueError(f"x{what} has {len(xi)} examples but y{what} has {len(yi)} labels.")
        if len(oi) != len(yi):
            raise ValueError(f"original_label{what} has {len(oi)} entries but y{what} has {len(yi)} labels.")
    if len(xs) == 2 and xs[0].shape[1:] != xs[1].shape[1:]:
        raise ValueError(f"x has examples of shape {list(xs[0].shape[1:])} but x_test {list(xs[1].shape[1:])}.")
    X, Y, O = torch.cat(xs), torch.cat(ys), torch.cat(origs)
    for what, lab in (("Labels", Y), ("Original labels", O)):
        if len(lab) and lab.min() < 0:
            raise ValueError(f"{what} must be non-negative class indices; got {int(lab.min())}.")
    k = int(max(int(Y.max()), int(O.max()))) + 1 if num_classes is None and len(Y) else int(num_classes or 0)
    for what, lab in (("Label", Y), ("Original label", O)):
        if len(lab) and lab.max() >= k:
            raise ValueError(f"{what} {int(lab.max())} is out of range for num_classes={k}.")
    n = len(xs[0])
    if split is not None:
        split = np.asarray(split).astype(object).reshape(-1)
        if len(split) != len(X):
            raise ValueError(f"split has {len(split)} entries but x has {len(X)} examples.")
        bad = sorted(set(split.tolist()) - {"train", "test"})
        if bad:
            raise ValueError(f"split entries must be 'train' or 'test'; got {bad[:5]}.")
    else:
        split = np.array(["train"] * n + ["test"] * (len(X) - n), dtype=object)
    flipped = (Y != O).numpy()
    if (flipped & (split == "test")).any():
        raise ValueError(f"{int((flipped & (split == 'test')).sum())} test example(s) have y != original_label; "
                         "test labels are never flipped (memloc measures test accuracy against the true labels).")
    group = np.where(split == "train", np.where(flipped, "noisy", "clean"), "test").astype(object)
    if example_id is None:
        ids = torch.arange(len(X))
    else:
        ids = arr(example_id, "example_id").long().reshape(-1)
        if len(ids) != len(X):
            raise ValueError(f"example_id has {len(ids)} entries but there are {len(X)} examples (train + test).")
        if len(ids) and ids.min() < 0:
            raise ValueError(f"example ids must be non-negative integers; got {int(ids.min())}.")
        if len(torch.unique(ids)) != len(ids):
            u, c = torch.unique(ids, return_counts=True)
            raise ValueError(f"example ids must be unique; {u[c > 1][:5].tolist()} occur more than once.")
    meta = dict(meta or {})
    if original_label is not None:
        n_train = int((split == "train").sum())
        meta.setdefault("noise", {"fraction": float(flipped.sum() / max(n_train, 1)), "count": int(flipped.sum()),
                                  "source": "given"})
    return Dataset(x=X, y=Y.clone(), original_label=O.clone(), example_id=ids, split=split, group=group,
                   num_classes=k, name=name, meta=meta)


def from_torch(train, test=None, *, original_label=None, example_id=None, num_classes: int | None = None,
               name: str = "torch", batch_size: int = 1024) -> Dataset:
    """Build a :class:`Dataset` from ``torch.utils.data.Dataset`` objects whose items are ``(x, y, ...)``.

    Every item is read once (through a ``DataLoader`` without shuffling, so transforms run once: use the
    evaluation transform, not random augmentation) and the inputs are stacked into one tensor.
    ``original_label`` / ``example_id`` as in :func:`from_arrays` (default ids: the training items' indices,
    then the test items after them).
    """
    from torch.utils.data import DataLoader

    def read(ds, what):
        xs, ys = [], []
        for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise ValueError(f"Items of the {what} dataset must be (x, y, ...) pairs; got {type(batch).__name__}.")
            xs.append(torch.as_tensor(batch[0]))
            ys.append(torch.as_tensor(batch[1]))
        if not xs:
            raise ValueError(f"The {what} dataset is empty.")
        return torch.cat(xs), torch.cat(ys)

    x, y = read(train, "training")
    xt, yt = read(test, "test") if test is not None else (None, None)
    return from_arrays(x, y, xt, yt, original_label=original_label, example_id=example_id, num_classes=num_classes,
                       name=name)
