"""Example-tied dropout analysis (Maini et al. 2023): accuracy with memorization units kept or dropped.

Train with ``memloc.train(..., example_tied_dropout={...})`` (or ``memloc train --example-tied-dropout``);
the mechanism is :class:`memloc.models.dropout.ExampleTiedDropout`. This module measures a run in its modes.
"""
from __future__ import annotations

import pandas as pd

from ..results import make_result
from ..train import Run, evaluate, group_accuracy

ETD_MODES = ("own", "expect", "drop")


def dropout_accuracies(run: Run, epoch: int | None = None, batch_size: int = 1024) -> pd.DataFrame:
    """Accuracy per mode and group of a run trained with example-tied dropout.

    Modes: ``own`` (each training example with its own memorization mask, as trained), ``expect``
    (memorization units at their expected scale ``p_mem``: the usual evaluation) and ``drop`` (memorization
    units zeroed, generalization units rescaled). Rows: ``mode, group, accuracy, n``.
    """
    etd = run.etd()
    if etd is None:
        raise ValueError(f"{run.path} was trained without example-tied dropout; train with "
                         "example_tied_dropout={...} (CLI: --example-tied-dropout).")
    model, data, examples = run.model(epoch), run.data(), run.examples
    rows = []
    for mode in ETD_MODES:
        acc = group_accuracy(evaluate(model, data, batch_size, etd=etd, etd_mode=mode), examples)
        for g in ("clean", "noisy", "test"):
            rows.append({"mode": mode, "group": g, "accuracy": acc[g], "n": int((examples.group == g).sum())})
    return make_result(pd.DataFrame(rows), method="example_tied_dropout", run=str(run.path), **etd.to_dict(),
                       epoch=epoch if epoch is not None else run.epochs[-1], seed=run.config.seed,
                       config=run.config.to_dict())
