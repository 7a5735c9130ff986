"""The dataset container every memloc function takes: tensors plus stable example ids and groups."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

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
            raise KeyError(f"Unknown example id(s) {missing[:10].tolist()}; ids run from "
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


def from_arrays(x, y, x_test=None, y_test=None, *, num_classes: int | None = None, name: str = "arrays",
                meta: dict | None = None) -> Dataset:
    """Build a :class:`Dataset` from plain arrays or tensors.

    Args:
        x: ``[N, ...]`` training inputs; y: ``[N]`` integer labels in ``[0, K)``.
        x_test, y_test: optional ``[M, ...]`` / ``[M]`` test examples.
        num_classes: K; inferred as ``max(label) + 1`` when omitted.
    Training examples get ids ``0..N-1``, test examples ``N..N+M-1``.
    """
    xs = [torch.as_tensor(np.asarray(x), dtype=torch.float32)]
    ys = [torch.as_tensor(np.asarray(y)).long().reshape(-1)]
    if (x_test is None) != (y_test is None):
        raise ValueError("Give both x_test and y_test, or neither.")
    if x_test is not None:
        xs.append(torch.as_tensor(np.asarray(x_test), dtype=torch.float32))
        ys.append(torch.as_tensor(np.asarray(y_test)).long().reshape(-1))
    for xi, yi in zip(xs, ys):
        if len(xi) != len(yi):
            raise ValueError(f"x has {len(xi)} examples but y has {len(yi)} labels.")
    if len(xs) == 2 and xs[0].shape[1:] != xs[1].shape[1:]:
        raise ValueError(f"x has examples of shape {list(xs[0].shape[1:])} but x_test {list(xs[1].shape[1:])}.")
    X, Y = torch.cat(xs), torch.cat(ys)
    if len(Y) and Y.min() < 0:
        raise ValueError(f"Labels must be non-negative class indices; got {int(Y.min())}.")
    k = int(Y.max()) + 1 if num_classes is None else int(num_classes)
    if len(Y) and Y.max() >= k:
        raise ValueError(f"Label {int(Y.max())} is out of range for num_classes={k}.")
    n = len(xs[0])
    split = np.array(["train"] * n + ["test"] * (len(X) - n), dtype=object)
    group = np.where(split == "train", "clean", "test").astype(object)
    return Dataset(x=X, y=Y.clone(), original_label=Y.clone(), example_id=torch.arange(len(X)), split=split,
                   group=group, num_classes=k, name=name, meta=dict(meta or {}))
