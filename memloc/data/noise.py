"""Symmetric label noise that records which examples were flipped."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from .core import Dataset


def inject_label_noise(data: Dataset, fraction: float, seed: int = 0) -> Dataset:
    """Flip exactly ``round(fraction * n_train)`` training labels, each to a wrong class drawn uniformly.

    The flipped examples are drawn uniformly without replacement from the training split; each gets the label
    ``(y + r) mod K`` with ``r`` uniform in ``{1, ..., K-1}``, i.e. uniform over all K-1 wrong classes (the
    Maini et al. reference code draws ``r`` from ``{1..K-2}`` and so never produces ``y-1``; memloc does not
    repeat that). Test examples are never flipped. ``round`` is Python's (ties to even).

    Returns a new :class:`Dataset` (the input is untouched) whose ``y`` holds the training labels,
    ``original_label`` the true ones and ``group`` is ``"noisy"`` for flipped examples; ``meta`` records the
    fraction, seed and count. Uses a private generator: global random state is not touched.
    """
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not (0.0 <= fraction < 1.0):
        raise ValueError(f"The label-noise fraction must be a number in [0, 1). Got {fraction!r} instead.")
    if data.num_classes < 2:
        raise ValueError(f"Label noise needs at least 2 classes; this dataset has {data.num_classes}.")
    if (data.group == "noisy").any():
        raise ValueError("This dataset already has label noise; inject noise into the clean dataset instead.")
    train_pos = np.flatnonzero(data.split == "train")
    count = round(fraction * len(train_pos))
    rng = np.random.default_rng(seed)
    flip = np.sort(rng.choice(train_pos, size=count, replace=False))
    shift = rng.integers(1, data.num_classes, size=count)  # 1..K-1 inclusive
    y = data.y.clone()
    y[torch.as_tensor(flip)] = (data.original_label[torch.as_tensor(flip)] + torch.as_tensor(shift)) % data.num_classes
    group = data.group.copy()
    group[flip] = "noisy"
    meta = dict(data.meta)
    meta["noise"] = {"fraction": float(fraction), "seed": int(seed), "count": int(count)}
    return replace(data, y=y, group=group, meta=meta)
