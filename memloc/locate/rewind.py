"""Layer rewinding (Maini et al. 2023, sec. 1b of the reference notes).

For each layer and each chosen earlier checkpoint, the final model's layer is replaced by its value at that
checkpoint and accuracy is measured on clean training examples, on noisy training examples against their
*flipped* labels (memorization that survives the rewind) and on test examples.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
from tqdm.auto import tqdm

from ..hooks import replace_parameters
from ..results import make_result
from ..train import Run
from ._common import frame, group_accuracies, layer_keys, long_accuracy_rows, resolve_layers


def default_rewind_epochs(run: Run) -> list[int]:
    """Every saved epoch up to the one where all noisy examples were first fit (all epochs if never)."""
    epochs = run.epochs
    s = run.summary or {}
    last = s.get("noisy_fit_epoch") or epochs[-1]
    return [e for e in epochs if e <= last and e != epochs[-1]] or epochs[:1]


def before_memorization_epoch(run: Run, epochs: Sequence[int] | None = None) -> int:
    """The first epoch (among ``epochs``) at which >= 90% of clean examples were fit: clean patterns are
    learned, most flipped labels not yet. Falls back to the middle epoch when the run has no history."""
    epochs = sorted(epochs or run.epochs)
    hist = {h["epoch"]: h for h in (run.summary or {}).get("history", [])}
    for e in epochs:
        if e in hist and hist[e].get("clean", 0) >= 0.9:
            return e
    return epochs[len(epochs) // 2]


def rewind_layers(run: Run, layers: str | Sequence[str] | None = None, epochs: Sequence[int] | None = None,
                  include_buffers: bool = True, batch_size: int = 2048, progress: bool = True) -> pd.DataFrame:
    """Accuracy of the final model with one layer at a time rewound to an earlier checkpoint.

    Args:
        run: a finished :class:`~memloc.train.Run`.
        layers: module paths (default: ``layer_names(model, head=True)``, e.g. Maini's 9 ResNet-9 groups; the
            head is one of them).
        epochs: checkpoints to rewind to (default :func:`default_rewind_epochs`).
        include_buffers: rewind normalisation buffers (BatchNorm running statistics) together with the
            parameters (default on; the reference code does not, which mixes final statistics with old weights).
    Returns a result with one row per (layer, epoch, group): ``layer, epoch, group, accuracy, n``; the row with
    ``layer == "none"`` is the final model. Settings record the run, epochs and ``include_buffers``.
    """
    model = run.model()
    layers = resolve_layers(model, layers, head=True)
    epochs = list(default_rewind_epochs(run) if epochs is None else epochs)
    missing = sorted(set(epochs) - set(run.epochs))
    if missing:
        raise ValueError(f"No checkpoint for epoch(s) {missing}; saved epochs are {run.epochs}.")
    data = run.data()
    final_epoch = run.epochs[-1]
    rows = long_accuracy_rows(group_accuracies(model, data, batch_size), data, layer="none", epoch=final_epoch)
    keys = {layer: layer_keys(model, layer, buffers=include_buffers) for layer in layers}
    bar = tqdm(total=len(layers) * len(epochs), desc="rewind", disable=not progress, leave=False)
    for epoch in epochs:
        ck = run.checkpoint(epoch)
        for layer in layers:
            with replace_parameters(model, {k: ck[k] for k in keys[layer]}):
                acc = group_accuracies(model, data, batch_size)
            rows += long_accuracy_rows(acc, data, layer=layer, epoch=epoch)
            bar.update(1)
    bar.close()
    return make_result(frame(rows), method="rewind", run=str(run.path), epochs=epochs, layers=layers,
                       include_buffers=include_buffers, final_epoch=final_epoch, seed=run.config.seed,
                       config=run.config.to_dict())
