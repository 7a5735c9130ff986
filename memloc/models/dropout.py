"""Example-tied dropout (Maini et al. 2023): per-example memorization units, applied through site hooks.

At each chosen site with C units (features/channels), the first ``floor(p_fixed * C)`` units are
*generalization* units, always on; each remaining *memorization* unit is kept for training example ``i`` with
probability ``p_mem``, by a mask drawn once (seeded) and fixed for all epochs. Masks are a boolean
``[n_examples, n_memorization_units]`` tensor per site, indexed by example id (no dense float tensors, no
hard-coded maximum id, no global reseeding).

Defaults ``p_fixed=0.2, p_mem=0.1`` are those of the reference ``dropout.py``. On the MNIST-1D testbed,
ETD at the last hidden layer only (memloc's default site) fits all flipped labels with their own masks and
dropping the memorization units takes them to near chance while test accuracy holds; ETD after every hidden
layer compounds the ``drop``-mode rescaling and costs test accuracy.

Modes (``apply(model, mode, ids)``):
- ``"train"``: generalization units unchanged, memorization units multiplied by example ``i``'s mask (no
  rescaling, as in the reference);
- ``"expect"``: memorization units multiplied by ``p_mem`` (their expected value: the usual evaluation);
- ``"drop"``: memorization units zeroed and generalization units scaled by ``(p_fixed + p_mem) / p_fixed``;
- ``"off"``: nothing.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

MODES = ("train", "expect", "drop", "off")


class ExampleTiedDropout:
    """Per-example memorization units at ``sites`` of a model (see the module docstring)."""

    def __init__(self, sites: Sequence[str], n_examples: int, p_fixed: float = 0.2, p_mem: float = 0.1, seed: int = 0):
        if isinstance(sites, str):
            sites = [sites]
        if not sites:
            raise ValueError("Example-tied dropout needs at least one site.")
        if not 0 < p_fixed < 1:
            raise ValueError(f"The 'p_fixed' parameter must be in (0, 1). Got {p_fixed!r} instead.")
        if not 0 < p_mem <= 1:
            raise ValueError(f"The 'p_mem' parameter must be in (0, 1]. Got {p_mem!r} instead.")
        if not isinstance(n_examples, int) or n_examples < 1:
            raise ValueError(f"The 'n_examples' parameter must be an int in [1, inf). Got {n_examples!r} instead.")
        self.sites, self.n_examples = list(sites), n_examples
        self.p_fixed, self.p_mem, self.seed = p_fixed, p_mem, seed
        self._masks: dict[str, torch.Tensor] = {}

    def n_fixed(self, n_units: int) -> int:
        return int(math.floor(self.p_fixed * n_units))

    def mask(self, site: str, n_units: int) -> torch.Tensor:
        """``[n_examples, n_units - n_fixed]`` bool: which memorization units each example keeps."""
        m = self._masks.get(site)
        if m is None or m.shape[1] != n_units - self.n_fixed(n_units):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.sites.index(site))
            m = torch.rand(self.n_examples, n_units - self.n_fixed(n_units), generator=g) < self.p_mem
            self._masks[site] = m
        return m

    def memorization_units(self, n_units: int) -> range:
        return range(self.n_fixed(n_units), n_units)

    @contextmanager
    def apply(self, model: nn.Module, mode: str = "expect", ids: torch.Tensor | None = None) -> Iterator[None]:
        """Apply the dropout to forward passes inside the block; ``ids [B]`` are needed in ``"train"`` mode."""
        from ..hooks import hooks, neuron_dim

        if mode not in MODES:
            raise ValueError(f"The 'mode' parameter must be one of {list(MODES)}. Got {mode!r} instead.")
        if mode == "off":
            yield
            return
        if mode == "train":
            if ids is None:
                raise ValueError("Example-tied dropout in 'train' mode needs the batch's example ids.")
            ids = torch.as_tensor(ids, dtype=torch.long)
            if len(ids) and (ids.min() < 0 or ids.max() >= self.n_examples):
                raise IndexError(f"Example ids must be in [0, {self.n_examples}); got {int(ids.min())}..{int(ids.max())}.")

        def make(site: str):
            dim = neuron_dim(model, site)

            def fn(out: torch.Tensor) -> torch.Tensor:
                d = dim % out.ndim
                n = out.shape[d]
                k = self.n_fixed(n)
                shape = [1] * out.ndim
                if mode == "train":
                    if out.shape[0] != len(ids):
                        raise ValueError(f"Site {site!r} got a batch of {out.shape[0]} but {len(ids)} example ids.")
                    keep = torch.ones(len(ids), n, dtype=out.dtype, device=out.device)
                    keep[:, k:] = self.mask(site, n)[ids.cpu()].to(device=out.device, dtype=out.dtype)
                    shape[0], shape[d] = len(ids), n
                else:
                    keep = torch.empty(n, dtype=out.dtype, device=out.device)
                    if mode == "expect":
                        keep[:k], keep[k:] = 1.0, self.p_mem
                    else:  # drop
                        keep[:k], keep[k:] = (self.p_fixed + self.p_mem) / self.p_fixed, 0.0
                    shape[d] = n
                return out * keep.view(shape)
            return fn

        with hooks(model, {s: make(s) for s in self.sites}):
            yield

    def to_dict(self) -> dict:
        return {"sites": self.sites, "p_fixed": self.p_fixed, "p_mem": self.p_mem}
