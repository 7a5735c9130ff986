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


def _settings_line(df: pd.DataFrame, keys: list[str]) -> str:
    s = df.attrs.get("settings", {})
    cfg = s.get("config", {})
    base = (f"{cfg.get('model', '?')} on {cfg.get('dataset', '?')}, {cfg.get('noise', 0):.0%} flipped, "
            f"seed {cfg.get('seed', '?')}") if cfg else ""
    extra = ", ".join(f"{k}={s[k]}" for k in keys if k in s)
    return "; ".join(x for x in (base, extra) if x)


def plot_rewind(df: pd.DataFrame):
    """Heatmaps layer x rewind epoch of noisy (vs flipped labels) and clean accuracy, from :func:`rewind_layers`."""
    import matplotlib.pyplot as plt

    d = df[df.layer != "none"]
    layers = list(dict.fromkeys(d.layer))
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.45 * len(layers) + 2.2), constrained_layout=True)
    for ax, group in zip(axes, ("noisy", "clean", "test")):
        t = d[d.group == group].pivot(index="layer", columns="epoch", values="accuracy").loc[layers]
        im = ax.imshow(t.values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        step = max(1, t.shape[1] // 15)
        ax.set_xticks(range(0, t.shape[1], step), t.columns[::step], fontsize=7)
        ax.set_yticks(range(len(layers)), layers, fontsize=8)
        ax.set(xlabel="rewound to epoch", title=f"{group} accuracy" + (" (flipped labels)" if group == "noisy" else ""))
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle("Layer rewinding: " + _settings_line(df, ["include_buffers"]), fontsize=9)
    return fig


def plot_retrain(df: pd.DataFrame):
    """Noisy and clean accuracy per retraining epoch, one curve per reset layer, from :func:`retrain_layers`."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for layer, d in df.groupby("layer", sort=False):
        for ax, group in zip(axes, ("noisy", "clean")):
            c = d[d.group == group]
            ax.plot(c.epoch, c.accuracy, marker="o", ms=3, label=layer)
    axes[0].set(title="noisy examples (vs flipped labels)", xlabel="retraining epoch (clean examples only)",
                ylabel="accuracy", ylim=(-0.02, 1.02))
    axes[1].set(title="clean examples", xlabel="retraining epoch", ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=7, title="reset layer")
    fig.suptitle("Layer retraining: " + _settings_line(df, ["optimizer", "lr", "max_epochs"]), fontsize=9)
    return fig


def plot_ablation(df: pd.DataFrame):
    """Units zeroed to flip clean vs noisy examples, and the layers those units are in, from :func:`greedy_flip`."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), constrained_layout=True)
    top = int(df.n_units.max()) if len(df) else 1
    bins = np.arange(0, top + 2) - 0.5
    for group in ("clean", "noisy"):
        d = df[df.group == group]
        if len(d):
            axes[0].hist(d.n_units, bins=bins, alpha=0.6, color=GROUP_COLORS[group],
                         label=f"{group} (median {d.n_units.median():g}, n={len(d)})")
            axes[2].scatter(d.n_units + np.random.default_rng(0).uniform(-0.2, 0.2, len(d)), d.test_acc_change,
                            s=8, alpha=0.6, color=GROUP_COLORS[group], label=group)
    axes[0].set(xlabel="units zeroed to flip the prediction", ylabel="examples")
    axes[0].legend(fontsize=8)
    layers = list(df.attrs.get("settings", {}).get("layers", [])) or sorted({l for ls in df.unit_layers for l in ls})
    width = 0.4
    for k, group in enumerate(("clean", "noisy")):
        counts = pd.Series([l for ls in df[df.group == group].unit_layers for l in ls]).value_counts()
        frac = counts.reindex(layers, fill_value=0) / max(1, counts.sum())
        axes[1].bar(np.arange(len(layers)) + (k - 0.5) * width, frac.values, width, color=GROUP_COLORS[group],
                    label=group)
    axes[1].set_xticks(range(len(layers)), layers, rotation=30, fontsize=8)
    axes[1].set(ylabel="fraction of zeroed units", title="where the units are")
    axes[1].legend(fontsize=8)
    axes[2].axhline(0, color="grey", lw=0.8)
    axes[2].set(xlabel="units zeroed", ylabel="test accuracy change", title="cost of the flip")
    fig.suptitle("Greedy neuron ablation: " + _settings_line(df, ["batch_size", "keep_weight", "noise_samples",
                                                                  "max_units"]), fontsize=9)
    return fig


def plot_dropout(df: pd.DataFrame):
    """Bar chart of accuracy per group with memorization units kept (own mask / expectation) or dropped."""
    import matplotlib.pyplot as plt
    import numpy as np

    modes = list(dict.fromkeys(df["mode"]))
    fig, ax = plt.subplots(figsize=(7, 3.6), constrained_layout=True)
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        d = df[df["mode"] == mode].set_index("group").reindex(["clean", "noisy", "test"])
        bars = ax.bar(np.arange(3) + (k - (len(modes) - 1) / 2) * width, d.accuracy, width, label=mode)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(3), ["clean", "noisy (flipped labels)", "test"])
    ax.set(ylabel="accuracy", ylim=(0, 1.1))
    ax.legend(title="memorization units", fontsize=8)
    ax.set_title("Example-tied dropout: " + _settings_line(df, ["sites", "p_fixed", "p_mem"]), fontsize=9)
    return fig


def save_figure(fig, path) -> None:
    """Write a figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    from ..results import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_layer_similarity(df: pd.DataFrame, same_layer: pd.DataFrame | None = None):
    """Heatmap of layer x layer similarity (from ``compare_layers(cross=True)``), and optionally a line per
    method of same-layer similarity (from ``compare_layers(cross=False)`` results concatenated)."""
    import matplotlib.pyplot as plt

    la, lb = list(dict.fromkeys(df.layer_a)), list(dict.fromkeys(df.layer_b))
    t = df.pivot(index="layer_a", columns="layer_b", values="similarity").loc[la, lb]
    ncols = 2 if same_layer is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4.2), constrained_layout=True, squeeze=False)
    ax = axes[0, 0]
    im = ax.imshow(t.values, vmin=0, vmax=1, cmap="magma")
    for i in range(len(la)):
        for j in range(len(lb)):
            ax.text(j, i, f"{t.values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if t.values[i, j] < 0.6 else "black")
    s = df.attrs.get("settings", {})
    ax.set_xticks(range(len(lb)), lb, rotation=30, fontsize=8)
    ax.set_yticks(range(len(la)), la, fontsize=8)
    ax.set(xlabel=f"B: noise {s.get('config_b', {}).get('noise', '?')}", ylabel=f"A: noise {s.get('config', {}).get('noise', '?')}",
           title=f"{s.get('method', '')} between layers ({s.get('n_examples', '?')} examples)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    if same_layer is not None:
        ax = axes[0, 1]
        for method, d in same_layer.groupby("method", sort=False):
            ax.plot(d.layer_a, d.similarity, marker="o", label=method)
        ax.set(ylim=(0, 1.02), xlabel="layer", ylabel="similarity of A and B at the same layer",
               title="same layer, A vs B")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(_settings_line(df, ["split", "seed"]), fontsize=9)
    return fig


def plot_checkpoint_similarity(df: pd.DataFrame):
    """Similarity of each layer with its final state across checkpoints (``checkpoint_similarity``)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    for layer, d in df.groupby("layer", sort=False):
        ax.plot(d.epoch, d.similarity, marker="o", ms=3, label=layer)
    m = df.attrs.get("settings", {}).get("method", "")
    ax.set(xlabel="epoch", ylabel=f"{m} with the final model", ylim=(0, 1.02), title="which layers settle first")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(_settings_line(df, ["n_examples"]), fontsize=9)
    return fig


def plot_layer_dimensions(df: pd.DataFrame):
    """Intrinsic dimension per layer for all / clean / noisy examples (``layer_dimensions``)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    colors = {"all": "black", **GROUP_COLORS}
    for g, d in df.groupby("group", sort=False):
        ax.plot(d.layer, d.dimension, marker="o", color=colors.get(g), label=f"{g} (n={int(d.n_points.max())})")
    est = df.attrs.get("settings", {}).get("estimator", "")
    ax.set(xlabel="layer", ylabel=f"intrinsic dimension ({est})", title="intrinsic dimension by layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(_settings_line(df, ["max_examples"]), fontsize=9)
    return fig


def plot_knn_probe(df: pd.DataFrame):
    """k-NN probe accuracy per layer (``knn_probe``): test examples, and noisy examples against their original
    and their flipped labels."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    styles = {("test", "true"): ("test (true label)", GROUP_COLORS["test"], "-"),
              ("noisy", "original"): ("noisy vs original label", GROUP_COLORS["noisy"], "-"),
              ("noisy", "flipped"): ("noisy vs flipped label", GROUP_COLORS["noisy"], "--")}
    for (g, t), d in df.groupby(["group", "target"], sort=False):
        label, color, ls = styles[(g, t)]
        ax.plot(d.layer, d.accuracy, marker="o", color=color, ls=ls, label=label)
    k = df.attrs.get("settings", {}).get("k", "")
    ax.set(xlabel="layer", ylabel=f"{k}-NN accuracy (fit on clean examples)", ylim=(-0.02, 1.02),
           title="where class structure is lost for memorized examples")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(_settings_line(df, ["n_fit"]), fontsize=9)
    return fig


def plot_neural_collapse(df: pd.DataFrame):
    """Mean distance of penultimate features to the mean test feature of the true class, noisy vs clean."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), constrained_layout=True)
    ax.plot(df.epoch, df["mean"], marker="o", color=GROUP_COLORS["noisy"], label="noisy (flipped) examples")
    ax.plot(df.epoch, df.clean_mean, marker="o", color=GROUP_COLORS["clean"], label="clean examples")
    ax.set(xlabel="epoch", ylabel="distance to true-class test mean", title="neural-collapse memorization")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(_settings_line(df, []), fontsize=9)
    return fig


def plot_score_histograms(scores: pd.DataFrame, columns=None, auroc: pd.DataFrame | None = None):
    """One histogram per score, clean vs noisy examples (density), with the AUROC in the title if given."""
    import matplotlib.pyplot as plt
    import numpy as np

    from .scores import DIRECTION

    cols = [c for c in (columns or scores.columns) if c in DIRECTION and c in scores]
    auc = auroc.set_index("score").auroc if auroc is not None and len(auroc) else {}
    ncol = min(4, len(cols))
    nrow = int(np.ceil(len(cols) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.7 * nrow), constrained_layout=True, squeeze=False)
    for ax, col in zip(axes.flat, cols):
        vals = scores[col].dropna()
        lo, hi = np.percentile(vals, [0.5, 99.5]) if len(vals) else (0, 1)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 40)
        for g in ("clean", "noisy"):
            v = scores.loc[scores.group == g, col].dropna().clip(lo, hi)
            if len(v):
                ax.hist(v, bins=bins, density=True, alpha=0.55, color=GROUP_COLORS[g], label=g)
        arrow = "high" if DIRECTION[col] > 0 else "low"
        title = f"{col}" + (f"  AUROC {auc[col]:.3f}" if col in auc else "")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"memorized = {arrow}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Memorization scores: " + _settings_line(scores, []), fontsize=9)
    return fig


def plot_gallery(scores: pd.DataFrame, data, score: str, n: int = 8):
    """The ``n`` most and ``n`` least memorized training examples by ``score``, drawn as signals (1-D inputs)
    or images (2-D), titled with their given and original labels."""
    import matplotlib.pyplot as plt
    import numpy as np

    from .scores import DIRECTION

    d = scores.dropna(subset=[score]).copy()
    d["_o"] = DIRECTION.get(score, 1) * d[score]
    d = d.sort_values("_o")
    picks = [("most memorized", d.tail(n)[::-1]), ("least memorized", d.head(n))]
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.8), constrained_layout=True, squeeze=False)
    for r, (label, rows) in enumerate(picks):
        sub = data.by_ids(rows.example_id.to_numpy())
        for c in range(n):
            ax = axes[r, c]
            if c >= len(sub):
                ax.axis("off")
                continue
            x = sub.x[c].squeeze().numpy()
            side = int(round(np.sqrt(x.size)))
            if x.ndim == 1 and data.name == "digits" and side * side == x.size:
                x = x.reshape(side, side)  # flat 8x8 digits are images
            if x.ndim == 1:
                ax.plot(x, color="black", lw=1)
                ax.set_yticks([])
            else:
                img = np.moveaxis(x, 0, -1) if x.ndim == 3 else x
                ax.imshow((img - img.min()) / (np.ptp(img) + 1e-9), cmap="gray_r" if img.ndim == 2 else None)
                ax.set_yticks([])
            ax.set_xticks([])
            given, orig = int(sub.y[c]), int(sub.original_label[c])
            color = GROUP_COLORS["noisy"] if given != orig else "black"
            ax.set_title(f"id {int(sub.example_id[c])}\nlabel {given}" + (f" (was {orig})" if given != orig else ""),
                         fontsize=7, color=color)
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"Most (top) and least (bottom) memorized by {score}; red = flipped label", fontsize=9)
    return fig


def plot_sweep(table: pd.DataFrame):
    """One panel per method of a sweep table: a headline number against the noise rate, one line per
    dataset/model (mean over seeds, bars = min..max)."""
    import matplotlib.pyplot as plt

    headline = {
        "summary": ("test_acc", None, "test accuracy"),
        "rewind": ("accuracy", ("group", "noisy"), "noisy accuracy, layers rewound (mean)"),
        "retrain": ("accuracy", ("group", "noisy"), "noisy accuracy after retraining (mean over layers)"),
        "ablate": ("median_units", ("group", "noisy"), "median units to flip a noisy example"),
        "scores": ("auroc", ("score", "cumulative_loss"), "AUROC of cumulative loss"),
    }
    methods = [m for m in headline if m in set(table["method"])]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), constrained_layout=True,
                             squeeze=False)
    for ax, m in zip(axes[0], methods):
        col, filt, label = headline[m]
        d = table[table["method"] == m]
        if filt:
            d = d[d[filt[0]] == filt[1]]
        if m == "rewind" and "layer" in d:
            d = d[d.layer != "none"]
        per_seed = d.groupby(["dataset", "model", "noise", "seed"])[col].mean().reset_index()
        for (ds, mo), g in per_seed.groupby(["dataset", "model"]):
            s = g.groupby("noise")[col].agg(["mean", "min", "max"])
            ax.errorbar(s.index, s["mean"], yerr=[s["mean"] - s["min"], s["max"] - s["mean"]], marker="o",
                        capsize=3, label=f"{ds}/{mo}")
        ax.set(xlabel="label noise", ylabel=label, title=m)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"sweep {table.attrs.get('settings', {}).get('sweep', '')}: mean over seeds", fontsize=9)
    return fig


def plot_trace(df: pd.DataFrame, tokens: list[str] | None = None, title: str | None = None):
    """Heatmap of indirect effects, positions x layers, as in Meng et al.: from ``trace`` (one prompt, with
    ``tokens`` for labels) or ``trace_facts`` (averaged by token bucket)."""
    import matplotlib.pyplot as plt

    s = df.attrs.get("settings", {})
    if "bucket" in df:
        order = [b for b in ("before subject", "first subject", "middle subject", "last subject",
                             "first subsequent", "further", "last") if b in set(df.bucket)]
        t = df.groupby(["bucket", "layer"]).ie.mean().unstack().loc[order]
        labels = order
    else:
        t = df.pivot(index="position", columns="layer", values="ie")
        labels = tokens or [str(p) for p in t.index]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * t.shape[1], 0.45 * len(labels) + 1.6), constrained_layout=True)
    im = ax.imshow(t.values, cmap={"resid": "Purples", "mlp": "Greens", "attn": "Reds"}.get(s.get("kind"), "Blues"),
                   aspect="auto", vmin=min(0, float(t.values.min())))
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(t.shape[1]), t.columns)
    ax.set_xlabel("layer" + (f" (window {s.get('window')})" if s.get("window", 1) > 1 else ""))
    fig.colorbar(im, ax=ax, label="indirect effect on p(object)")
    ax.set_title(title or f"causal trace ({s.get('kind')}), noise {s.get('noise', 0):.3g}, {s.get('samples')} samples",
                 fontsize=9)
    return fig


def plot_edits(summary: pd.DataFrame):
    """Grouped bars of the edit metrics (percent) per condition, from :func:`memloc.edit.evaluate.summarize`."""
    import matplotlib.pyplot as plt
    import numpy as np

    cols = [c for c in ("es", "ps", "ns", "neighbour_acc", "other_acc", "unedited_acc") if c in summary]
    labels = {"es": "efficacy", "ps": "paraphrase", "ns": "neighbourhood", "neighbour_acc": "neighbour acc.",
              "other_acc": "subject's other facts", "unedited_acc": "unedited subjects' facts"}
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(cols), 3.8), constrained_layout=True)
    width = 0.8 / len(summary)
    x = np.arange(len(cols))
    for i, (_, row) in enumerate(summary.iterrows()):
        ax.bar(x + i * width - 0.4 + width / 2, [row.get(c, np.nan) for c in cols], width, label=row.condition)
    ax.set_xticks(x, [labels[c] for c in cols], rotation=15)
    ax.set(ylabel="%", ylim=(0, 105), title="Edits on the fact-world testbed")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_knowledge_neurons(neurons: pd.DataFrame, effects: dict):
    """Left: knowledge neurons per layer. Right: mean relative change of P(object) when a fact's knowledge neurons
    (or as many random neurons of the same layers) are scaled, per intervention ``{(name, split): frame}`` from
    :func:`memloc.locate.knowledge.intervene_knowledge_neurons`."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    counts = neurons.groupby("layer").size()
    axes[0].bar(counts.index, counts.values, color="#555")
    axes[0].set(xlabel="layer", ylabel="knowledge neurons (all facts)", xticks=list(counts.index))
    names = [f"{n}\n({s})" for n, s in effects]
    x = np.arange(len(effects))
    kn = [100 * df.change.mean() for df in effects.values()]
    rnd = [100 * df.random_change.mean() for df in effects.values()]
    unrel = [100 * df.unrelated_change.mean() for df in effects.values()]
    axes[1].bar(x - 0.27, kn, 0.27, label="knowledge neurons", color="#d62728")
    axes[1].bar(x, rnd, 0.27, label="random neurons", color="#7f7f7f")
    axes[1].bar(x + 0.27, unrel, 0.27, label="unrelated facts", color="#1f77b4")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_xticks(x, names)
    axes[1].set(ylabel="change of P(object), %")
    axes[1].legend(fontsize=8)
    st = neurons.attrs.get("settings", {})
    fig.suptitle(f"Knowledge neurons: {st.get('n_facts', '?')} facts, IG {st.get('steps', '?')} steps, threshold "
                 f"{st.get('threshold', '?')} x max, share >= {st.get('share', '?')}", fontsize=10)
    return fig


def plot_membership(table: pd.DataFrame):
    """AUC and TPR at 1% FPR against the number of reference models for each attack of
    :func:`memloc.analyses.privacy.rmia_vs_lira` (the loss attack, which needs none, as a line)."""
    import matplotlib.pyplot as plt

    s = table.attrs.get("settings", {})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for ax, col in zip(axes, ("auc", "tpr_at_1%_fpr")):
        for attack, g in table[table.k > 0].groupby("attack", sort=False):
            style = "-" if attack.startswith("rmia") else "--"
            ax.plot(g.k, g[col], style, marker="o", label=attack)
        loss = table[table.attack == "loss"]
        if len(loss):
            ax.axhline(float(loss[col].iloc[0]), color="gray", lw=1, label="loss (no reference)")
        ks = sorted(int(k) for k in table.k.unique() if k > 0)
        ax.set(xscale="log", xlabel="reference models k", ylabel=col.replace("_", " "))
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Membership inference: {s.get('n_models', '?')}-model ensemble, {s.get('n_targets', '?')} targets, "
                 f"RMIA a = {s.get('a', '?')}, gamma = {s.get('gamma', '?')} (offline LiRA scores only examples some "
                 "reference left out)", fontsize=8)
    return fig


def plot_lm_attacks(table: pd.DataFrame):
    """AUC of each sequence membership attack per member / non-member set
    (:func:`memloc.analyses.lm_attacks.lm_attack_suite`)."""
    import matplotlib.pyplot as plt
    import numpy as np

    sets = list(dict.fromkeys(table.set))
    attacks = list(dict.fromkeys(table.attack))
    fig, ax = plt.subplots(figsize=(2 + 0.9 * len(attacks) * max(1, len(sets)), 3.6), constrained_layout=True)
    w = 0.8 / max(1, len(sets))
    x = np.arange(len(attacks))
    for j, name in enumerate(sets):
        g = table[table.set == name].set_index("attack").reindex(attacks)
        n = f"{int(g.n_members.dropna().iloc[0])} vs {int(g.n_nonmembers.dropna().iloc[0])}"
        ax.bar(x + (j - (len(sets) - 1) / 2) * w, g.auc, w, label=f"{name} ({n})")
    ax.axhline(0.5, color="gray", lw=1, ls="--")
    ax.set(xticks=x, xticklabels=attacks, ylabel="AUC (member vs non-member)", ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower right")
    s = table.attrs.get("settings", {})
    ax.set_title(f"Sequence membership attacks (k = {s.get('k', '?')} for Min-K%, seed {s.get('seed', '?')})",
                 fontsize=9)
    return fig


def plot_trace_vs_edit(per_layer: pd.DataFrame, by_layer: pd.DataFrame | None = None):
    """Hase et al.'s question, from :func:`memloc.edit.evaluate.trace_vs_edit`: left, each (fact, layer)'s tracing
    effect against ROME's success there (rewrite + paraphrase margin), coloured by layer; right, per layer, the mean
    tracing effect (left axis) and ROME's efficacy and paraphrase success (right axis, percent; ``by_layer``:
    :func:`memloc.edit.evaluate.rome_by_layer`)."""
    import matplotlib.pyplot as plt

    st = per_layer.attrs.get("settings", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    sc = axes[0].scatter(per_layer.trace_ie, per_layer.edit_score, c=per_layer.layer, cmap="viridis", s=18)
    fig.colorbar(sc, ax=axes[0], label="layer")
    axes[0].set(xlabel="tracing: MLP indirect effect at the last subject token",
                ylabel="ROME at that layer: (rewrite + paraphrase margin) / 2",
                title=f"r = {st.get('pearson_all', float('nan')):.2f} over (fact, layer); within facts "
                      f"{st.get('pearson_within_fact', float('nan')):.2f}")
    m = per_layer.groupby("layer")[["trace_ie"]].mean()
    axes[1].bar(m.index, m.trace_ie, color="#999", label="tracing effect (mean)")
    axes[1].set(xlabel="layer", ylabel="mean indirect effect", xticks=list(m.index))
    if by_layer is not None:
        tw = axes[1].twinx()
        g = by_layer.groupby("layer")[["es", "ps", "ns"]].mean() * 100
        for c, col in (("es", "#d62728"), ("ps", "#1f77b4"), ("ns", "#2ca02c")):
            tw.plot(g.index, g[c], "o-", color=col, label={"es": "ROME efficacy", "ps": "paraphrase",
                                                           "ns": "neighbourhood"}[c])
        tw.set(ylabel="%", ylim=(0, 105))
        tw.legend(fontsize=8, loc="upper right")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Does localization inform editing? {st.get('n_facts', '?')} facts; tracing peak = best edit layer "
                 f"for {st.get('agree', float('nan')):.0%}", fontsize=10)
    return fig
