"""Figures. Plots take results (DataFrames), never models, and return a matplotlib Figure."""
from __future__ import annotations

import pandas as pd

GROUP_COLORS = {"clean": "#1f77b4", "noisy": "#d62728", "test": "#2ca02c"}


def plot_learning_curves(dynamics: pd.DataFrame, examples: pd.DataFrame, title: str | None = None):
    """Accuracy per epoch for clean, noisy (against their flipped labels) and test examples.

    Args:
        dynamics: a run's ``dynamics.parquet`` (uses the ``eval`` rows, or ``minibatch`` rows if there are none).
        examples: a run's ``examples.parquet`` (example_id, group, ...).
    Left: accuracy (noisy examples reaching 1.0 = memorized). Right: mean loss per group, log scale.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    source = "eval" if (dynamics.source == "eval").any() else "minibatch"
    df = dynamics[dynamics.source == source].merge(examples[["example_id", "group"]], on="example_id")
    curves = df.groupby(["group", "epoch"], observed=True).agg(acc=("correct", "mean"), loss=("loss", "mean"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for group, color in GROUP_COLORS.items():
        if group not in curves.index.get_level_values(0):
            continue
        c = curves.loc[group]
        label = "noisy (vs flipped label)" if group == "noisy" else group
        axes[0].plot(c.index, c.acc, color=color, label=label)
        axes[1].plot(c.index, c.loss, color=color, label=label)
    axes[0].set(xlabel="epoch", ylabel=f"accuracy ({source})", ylim=(-0.02, 1.02))
    axes[1].set(xlabel="epoch", ylabel="mean loss", yscale="log")
    axes[0].legend(loc="lower right")
    axes[0].grid(alpha=0.3)
    axes[1].grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig
