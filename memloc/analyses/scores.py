"""Which examples are memorized: per-example memorization scores, and how well each recovers the flipped labels.

All scores are per training example (``example_id``) and kept in their published units (a C-score is a held-out
accuracy in [0, 1], learning speed a mean accuracy). :data:`DIRECTION` says which way each points: ``+1`` if
higher means more memorized, ``-1`` if lower does; :func:`auroc_table` and :func:`agreement` orient them with it.
Results are tidy DataFrames with their settings.

Scores from a run's record (no extra compute):
    learning_speed      mean accuracy over presentations (Jiang et al. 2021's proxy; low = memorized)
    mean_confidence     mean softmax probability of the training label over presentations (low = memorized)
    forgetting_events   Toneva et al. 2019: 1 -> 0 transitions between consecutive presentations; an example
                        never learned counts as the number of epochs
    first_learned_epoch first epoch after which the example stays correctly classified (E + 1 if it is not
                        correct at the end)
    cumulative_loss     Ravikumar et al.: sum of the example's training loss over presentations (CSL)
    final_loss          loss at the last presentation (the baseline the epoch averages should beat)
Scores from the checkpoints:
    cumulative_gradient sum over checkpoints of ``||d loss / d x||^2`` (eval mode, per-example loss sums)
    curvature           Garg et al. 2024: Hutchinson estimate of input-space loss curvature averaged over
                        checkpoints; ``curvature_final`` uses the last checkpoint only
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..hooks import require_eval
from ..results import make_result

__all__ = ["DIRECTION", "dynamics_scores", "trajectory_scores", "input_gradient_norms", "curvature", "checkpoint_scores", "all_scores",
           "auroc_table", "agreement", "feldman_zhang", "fz_influence", "cscore", "second_split_forgetting",
           "holdout_retraining"]

DIRECTION = {"learning_speed": -1, "mean_confidence": -1, "forgetting_events": 1, "first_learned_epoch": 1,
             "cumulative_loss": 1, "final_loss": 1, "cumulative_gradient": 1, "curvature": 1,
             "curvature_final": 1, "fz_memorization": 1, "cscore": -1, "ssft": -1, "holdout_kl": 1,
             "lira": 1, "loss_attack": 1}


def dynamics_scores(run, source: str | None = None) -> pd.DataFrame:
    """Scores computed from a run's per-example record (``dynamics.parquet``), one row per training example.

    ``source="minibatch"`` uses the presentations just before each optimiser step (Toneva et al.'s
    convention); ``"eval"`` uses the end-of-epoch evaluation passes (epoch 0 excluded). The default is
    ``"minibatch"`` when the run recorded them (:func:`memloc.train`, :class:`~memloc.record.Recorder`) and
    ``"eval"`` otherwise (a run adapted from checkpoints); the settings say which. Columns: ``example_id,
    group`` and the scores of the module docstring.
    """
    if source not in (None, "minibatch", "eval"):
        raise ValueError(f"The 'source' parameter must be 'minibatch' or 'eval'. Got {source!r} instead.")
    ex = run.examples
    train_ids = ex.example_id[ex.split == "train"].to_numpy()
    dyn = run.dynamics
    if dyn.empty:
        from ..validate import InputFileError
        raise InputFileError(f"{run.path} has no dynamics record (dynamics.parquet), which the dynamics scores are "
                             "computed from; train the run with memloc.train or record it with memloc.Recorder.")
    unknown = np.setdiff1d(dyn.example_id.unique(), ex.example_id.to_numpy())
    if len(unknown):
        raise ValueError(f"{run.path}: its dynamics record has example ids {unknown[:5].tolist()} that its examples "
                         f"({len(ex)}) do not have; the data and the dynamics belong to different runs.")
    if source is None:
        source = "minibatch" if (dyn.source == "minibatch").any() else "eval"
    dyn = dyn[(dyn.source == source) & (dyn.epoch > 0) & dyn.example_id.isin(train_ids)]
    if dyn.empty:
        raise ValueError(f"{run.path} has no '{source}' rows after initialisation in its dynamics record.")
    counts = dyn.groupby("epoch").example_id.nunique()
    short = counts[counts != len(train_ids)]
    if len(short):
        raise ValueError(f"{run.path}: the '{source}' record of epoch(s) {short.index[:5].tolist()} covers "
                         f"{short.iloc[0]} of the {len(train_ids)} training examples; every epoch must present "
                         "every training example once (Recorder.batch for each example before epoch_end).")
    correct = dyn.pivot(index="example_id", columns="epoch", values="correct").sort_index(axis=1)
    loss = dyn.pivot(index="example_id", columns="epoch", values="loss").reindex_like(correct)
    conf = dyn.pivot(index="example_id", columns="epoch", values="confidence").reindex_like(correct)
    t = trajectory_scores(correct.to_numpy(bool), loss.to_numpy(), conf.to_numpy(), correct.columns.to_numpy())
    E = len(correct.columns)
    df = pd.DataFrame({"example_id": correct.index.to_numpy(), **t})
    df = df.merge(ex[["example_id", "group"]], on="example_id")
    return make_result(df[["example_id", "group"] + [k for k in df.columns if k not in ("example_id", "group")]],
                       scores="dynamics", source=source, epochs=int(E), run=str(run.path), direction=DIRECTION,
                       config=run.config.to_dict())


def trajectory_scores(correct: np.ndarray, loss: np.ndarray, confidence: np.ndarray, epochs: np.ndarray) -> dict:
    """Scores of per-example trajectories: ``correct``, ``loss``, ``confidence`` are ``[N, E]`` over the
    presentations at ``epochs`` (ascending). Returns a dict of ``[N]`` arrays (see the module docstring)."""
    c = np.asarray(correct, bool)
    E = c.shape[1]
    forgets = (c[:, :-1] & ~c[:, 1:]).sum(1)
    forgets = np.where(c.any(1), forgets, E)  # never learned: as many events as presentations
    wrong = ~c
    last_wrong = np.where(wrong.any(1), E - 1 - np.argmax(wrong[:, ::-1], axis=1), -1)
    first = np.where(last_wrong == E - 1, epochs[-1] + 1, epochs[np.minimum(last_wrong + 1, E - 1)])
    return {"learning_speed": c.mean(1), "mean_confidence": np.asarray(confidence).mean(1),
            "forgetting_events": forgets.astype(float), "first_learned_epoch": first.astype(float),
            "cumulative_loss": np.asarray(loss).sum(1), "final_loss": np.asarray(loss)[:, -1]}


def _ce_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def input_gradient_norms(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
                         loss_fn: Callable = _ce_sum) -> torch.Tensor:
    """``||d loss_i / d x_i||^2`` per example, ``x [N, ...]``, ``y [N]``; per-example losses are *summed* (not
    averaged) before the backward pass, so every example's gradient is its own, whatever the batch size."""
    from ..hooks import model_device

    require_eval(model, "Input-gradient scores")
    dev = model_device(model)
    out = []
    for s in range(0, len(x), batch_size):
        xb = x[s:s + batch_size].to(dev).clone().requires_grad_(True)
        g, = torch.autograd.grad(loss_fn(model(xb), y[s:s + batch_size].to(dev)).sum(), xb)
        out.append(g.flatten(1).pow(2).sum(1).detach().cpu())
    return torch.cat(out)


def curvature(model, x: torch.Tensor, y: torch.Tensor, n_directions: int = 10, h: float = 1e-3,
              form: str = "squared", normalize: bool = True, seed: int = 0, batch_size: int = 2048,
              loss_fn: Callable = _ce_sum, return_gradient_norms: bool = False):
    """Input-space loss curvature per example (Garg, Ravikumar & Roy 2024), batched over examples and directions.

    For Rademacher directions ``v_k`` (k = 1..n): ``d_k = grad_x L(x + h v_k) - grad_x L(x)``.
    ``form="squared"``: the paper's ``mean_k ||d_k||^2`` (Hutchinson's estimate of ``h^2 tr(H^2)``);
    ``form="norm"``: the released code's ``mean_k ||d_k||``. ``normalize`` divides by ``h^2`` (``h``), giving
    ``tr(H^2)`` (``E||Hv||``) so values do not depend on h. Losses are per-example sums, not batch means (the
    reference's mean inflates the last short batch). Directions come from a private generator seeded by ``seed``
    and the example's position. ``x [N, ...]``, ``y [N]`` -> ``[N]``; with ``return_gradient_norms`` also
    ``||grad_x L(x)||^2`` ``[N]``, which the estimate computes anyway. ``batch_size`` counts rows (examples x
    (directions + 1)) per pass. Runs on the model's device (directions are drawn on the CPU, so the values do
    not depend on the device); results come back on the CPU.
    """
    from ..hooks import model_device

    require_eval(model, "Curvature")
    dev = model_device(model)
    if form not in ("squared", "norm"):
        raise ValueError(f"The 'form' parameter must be 'squared' or 'norm'. Got {form!r} instead.")
    if not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"The 'n_directions' parameter must be an int in [1, inf). Got {n_directions!r} instead.")
    if not h > 0:
        raise ValueError(f"The 'h' parameter must be > 0. Got {h!r} instead.")
    g = torch.Generator().manual_seed(seed)
    v_all = (torch.randint(0, 2, (n_directions, *x.shape), generator=g, dtype=torch.int8) * 2 - 1)
    per_pass = max(1, batch_size // (n_directions + 1))
    out, norms = [], []
    for s in range(0, len(x), per_pass):
        xb, yb = x[s:s + per_pass].to(dev), y[s:s + per_pass].to(dev)
        b = len(xb)
        v = v_all[:, s:s + b].to(device=dev, dtype=x.dtype)
        inp = torch.cat([xb[None], xb[None] + h * v]).flatten(0, 1).clone().requires_grad_(True)
        grad, = torch.autograd.grad(loss_fn(model(inp), yb.repeat(n_directions + 1)).sum(), inp)
        grad = grad.view(n_directions + 1, b, -1)
        diff = (grad[1:] - grad[:1]).norm(dim=2)  # [n, b]
        val = diff.pow(2).mean(0) if form == "squared" else diff.mean(0)
        if normalize:
            val = val / (h ** 2 if form == "squared" else h)
        out.append(val.detach().cpu())
        norms.append(grad[0].pow(2).sum(1).detach().cpu())
    return (torch.cat(out), torch.cat(norms)) if return_gradient_norms else torch.cat(out)


def checkpoint_scores(run, epochs: Sequence[int] | None = None, n_directions: int = 10, h: float = 1e-3,
                      form: str = "squared", seed: int = 0, curvature_scores: bool = True,
                      progress: bool = True) -> pd.DataFrame:
    """Scores computed on the run's checkpoints (epochs 1..E by default), against the training labels.

    Columns: ``example_id, group, cumulative_gradient`` and, with ``curvature_scores``, ``curvature`` (mean over
    the checkpoints) and ``curvature_final`` (last checkpoint).
    """
    data = run.data().train
    epochs = [e for e in run.epochs if e > 0] if epochs is None else list(epochs)
    if not epochs:
        raise ValueError(f"{run.path} has no checkpoint after initialisation.")
    grad_sum = torch.zeros(len(data), dtype=torch.float64)
    curv_sum = torch.zeros(len(data), dtype=torch.float64)
    curv_last = None
    for e in tqdm(epochs, desc="checkpoint scores", disable=not progress, leave=False):
        model = run.model(e)
        for p in model.parameters():
            p.requires_grad_(False)
        if curvature_scores:
            c, gn = curvature(model, data.x, data.y, n_directions, h, form, seed=seed, return_gradient_norms=True)
            grad_sum += gn.double()
            curv_sum += c.double()
            curv_last = c.double()
        else:
            grad_sum += input_gradient_norms(model, data.x, data.y).double()
    df = pd.DataFrame({"example_id": data.example_id.numpy(), "group": data.group.astype(str),
                       "cumulative_gradient": grad_sum.numpy()})
    if curvature_scores:
        df["curvature"] = (curv_sum / len(epochs)).numpy()
        df["curvature_final"] = curv_last.numpy()
    return make_result(df, scores="checkpoints", epochs=epochs, n_directions=n_directions, h=h, form=form,
                       normalize=True, seed=seed, run=str(run.path), direction=DIRECTION, config=run.config.to_dict())


def all_scores(run, curvature_scores: bool = True, progress: bool = True, **kwargs) -> pd.DataFrame:
    """:func:`dynamics_scores` and :func:`checkpoint_scores` merged into one table (one row per training example)."""
    a = dynamics_scores(run)
    b = checkpoint_scores(run, curvature_scores=curvature_scores, progress=progress, **kwargs)
    df = a.merge(b.drop(columns="group"), on="example_id")
    return make_result(df, **{**a.attrs["settings"], **b.attrs["settings"], "scores": "all"})


def _score_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in ("example_id", "group") and pd.api.types.is_numeric_dtype(df[c])]


def auroc_table(scores: pd.DataFrame, positive: str = "noisy", negative: str = "clean") -> pd.DataFrame:
    """AUROC of each (oriented) score for telling ``positive`` examples (the flipped labels) from ``negative`` ones.

    Missing values (e.g. an example that was in every subset) are left out of that score's AUROC; ``n`` says how
    many examples were used. Rows: ``score, auroc, n_positive, n_negative``, sorted by AUROC.
    """
    from sklearn.metrics import roc_auc_score

    from ..validate import ConfigError

    for g in (positive, negative):
        if not (scores.group == g).any():
            raise ConfigError(f"The AUROC needs both {positive!r} and {negative!r} examples, but the scores have no "
                              f"{g!r} examples (groups present: {sorted(scores.group.unique())}); a run trained "
                              "without flipped labels has no 'noisy' ones.")
    rows = []
    for col in _score_columns(scores):
        if col not in DIRECTION:
            continue
        d = scores[scores.group.isin([positive, negative]) & scores[col].notna()]
        pos = (d.group == positive).to_numpy()
        if pos.all() or not pos.any():
            continue
        rows.append({"score": col, "auroc": float(roc_auc_score(pos, DIRECTION[col] * d[col])),
                     "n_positive": int(pos.sum()), "n_negative": int((~pos).sum())})
    return make_result(pd.DataFrame(rows).sort_values("auroc", ascending=False).reset_index(drop=True),
                       positive=positive, negative=negative, **{k: v for k, v in scores.attrs.get("settings", {}).items()
                                                                 if k in ("run", "config", "epochs")})


def _oriented(x: np.ndarray, name: str) -> np.ndarray:
    return x if DIRECTION[name] > 0 else x.max() - x


def agreement(scores: pd.DataFrame, reference: str | None = None, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Pearson, Spearman and cosine agreement between scores, each oriented by :data:`DIRECTION` (so positive
    means they agree on which examples are memorized), over all examples where both exist. A score where low
    means memorized is oriented as ``max - x`` (keeps it non-negative for the cosine).

    With ``reference`` (e.g. ``"fz_memorization"``), only pairs with it. Cosine is on the raw oriented values,
    as the CSL paper reports it (it runs high for non-negative scores; read it next to Pearson).
    """
    from scipy.stats import pearsonr, spearmanr

    cols = [c for c in (columns or _score_columns(scores)) if c in DIRECTION]
    pairs = [(reference, c) for c in cols if c != reference] if reference else \
        [(a, b) for i, a in enumerate(cols) for b in cols[i + 1:]]
    rows = []
    for a, b in pairs:
        d = scores[[a, b]].dropna()
        x, y = _oriented(d[a].to_numpy(float), a), _oriented(d[b].to_numpy(float), b)
        rows.append({"score_a": a, "score_b": b, "pearson": float(pearsonr(x, y)[0]),
                     "spearman": float(spearmanr(x, y)[0]),
                     "cosine": float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))), "n": len(d)})
    return make_result(pd.DataFrame(rows), reference=reference)


# ----------------------------------------------------------------------------------------------- ensemble scores

def feldman_zhang(ens, data=None) -> pd.DataFrame:
    """Feldman & Zhang (2020) memorization from an :class:`~memloc.ensemble.Ensemble`.

    ``mem(i) = mean_{m: i in S_m} correct_m(i) - mean_{m: i not in S_m} correct_m(i)``. An example that was in
    every subset (or in none) has no estimate: ``fz_memorization`` is NaN there, never 0. Columns:
    ``example_id, group, fz_memorization, acc_in, acc_out, n_in, n_out`` (``group`` if ``data`` is given).
    """
    m = ens.masks
    c = ens.correct_train.astype(float)
    n_in, n_out = m.sum(0), (~m).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc_in = np.where(n_in > 0, (c * m).sum(0) / n_in, np.nan)
        acc_out = np.where(n_out > 0, (c * ~m).sum(0) / n_out, np.nan)
    df = pd.DataFrame({"example_id": ens.train_ids, "fz_memorization": acc_in - acc_out, "acc_in": acc_in,
                       "acc_out": acc_out, "n_in": n_in, "n_out": n_out})
    if data is not None:
        df.insert(1, "group", data.by_ids(ens.train_ids).group.astype(str))
    return make_result(df, scores="feldman_zhang", **{k: v for k, v in ens.settings.items()})


def fz_influence(ens) -> np.ndarray:
    """Feldman-Zhang influence ``[n_train, n_test]``: ``infl(i, j) = mean_{m: i in S_m} correct_m(j) -
    mean_{m: i not in S_m} correct_m(j)`` (rows: ``ens.train_ids``, columns: ``ens.test_ids``; NaN rows for
    examples with no held-out or no included model)."""
    m = ens.masks.astype(float)
    c = ens.correct_test.astype(float)
    n_in, n_out = m.sum(0), (1 - m).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        inf = (m.T @ c) / n_in[:, None] - ((1 - m).T @ c) / n_out[:, None]
    inf[(n_in == 0) | (n_out == 0)] = np.nan
    return inf


def cscore(ensembles, data=None) -> pd.DataFrame:
    """C-score (Jiang et al. 2021): held-out accuracy averaged over subset ratios.

    ``ensembles``: one :class:`~memloc.ensemble.Ensemble` per ratio (e.g. 0.1..0.9). For each ratio,
    ``cs_r(i)`` is the mean correctness of the models that did *not* train on i; ``cscore`` is the mean over
    ratios where i was held out at least once (NaN if never). Low = atypical or mislabeled. Columns:
    ``example_id, group, cscore, cscore_<ratio>...``.
    """
    ids = ensembles[0].train_ids
    cols = {}
    for e in ensembles:
        if not np.array_equal(e.train_ids, ids):
            raise ValueError("All ensembles must cover the same training examples.")
        out = ~e.masks
        n = out.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            cols[f"cscore_{e.settings.get('ratio', 0):.2f}"] = np.where(n > 0, (e.correct_train * out).sum(0) / n, np.nan)
    per = pd.DataFrame(cols)
    df = pd.DataFrame({"example_id": ids, "cscore": per.mean(1, skipna=True).to_numpy()})
    df = pd.concat([df, per], axis=1)
    if data is not None:
        df.insert(1, "group", data.by_ids(ids).group.astype(str))
    return make_result(df, scores="cscore", ratios=[e.settings.get("ratio") for e in ensembles],
                       models_per_ratio=[e.n_models for e in ensembles])


# ----------------------------------------------------------------------------------------------- retraining scores

def _fit(model, x, y, epochs, cfg, seed, stop_at_fit: int | None = None, on_epoch=None):
    """Plain training loop used by SSFT and holdout retraining: the run's optimiser and batch size, on the
    model's device (``x``, ``y`` are moved there once)."""
    import math

    from ..hooks import model_device
    from ..train import _make_optimizer

    dev = model_device(model)
    x, y = x.to(dev), y.to(dev)
    opt = _make_optimizer(cfg, model)
    streak = 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for b in range(math.ceil(len(x) / cfg.batch_size)):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size].to(dev)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        if on_epoch is not None:
            on_epoch(epoch)
        if stop_at_fit is not None:
            with torch.no_grad():
                fit = bool((model(x).argmax(1) == y).all())
            streak = streak + 1 if fit else 0
            if streak >= stop_at_fit:
                break
    return model.eval()


def second_split_forgetting(run, forget_epochs: int = 20, fit_epochs: int | None = None, seed: int = 0,
                            progress: bool = True) -> pd.DataFrame:
    """Second-split forgetting time (Maini et al. 2022).

    The training examples are split in halves A and B (seeded). A fresh model (the run's own architecture from its
    model factory, initialised from ``seed``; the run's optimiser) is trained on A until it has fit A for 5 consecutive epochs (at most ``fit_epochs``, default the
    run's epoch budget), then trained on B for ``forget_epochs`` epochs with a fresh optimiser; after each epoch
    its predictions on A are recorded. ``ssft(i)`` is the first epoch after which i stays misclassified (against
    its training label) to the end: 1..forget_epochs, or ``forget_epochs + 1`` if it is still correct at the end.
    Then the halves swap. Low SSFT = forgotten fast = likely mislabeled. Columns: ``example_id, group, ssft``.
    """
    cfg = run.config
    run.warn_default_recipe("second-split forgetting")
    data = run.data().train
    fit_epochs = fit_epochs or cfg.epochs
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    halves = [perm[: len(data) // 2], perm[len(data) // 2:]]
    ssft = np.zeros(len(data))
    for k in tqdm(range(2), desc="second-split forgetting", disable=not progress, leave=False):
        a, b = halves[k], halves[1 - k]
        model = run.new_model(seed * 7 + k)
        _fit(model, data.x[a], data.y[a], fit_epochs, cfg, seed + k, stop_at_fit=5)
        record = []
        xa = data.x[a]

        def on_epoch(_):
            from ..locate._common import predictions
            record.append((predictions(model, xa) == data.y[a]).numpy())

        _fit(model, data.x[b], data.y[b], forget_epochs, cfg, seed + 10 + k, on_epoch=on_epoch)
        correct = np.stack(record, 1)  # [|A|, E]
        E = correct.shape[1]
        last_correct = np.where(correct.any(1), E - 1 - np.argmax(correct[:, ::-1], axis=1), -1)
        ssft[a.numpy()] = np.where(last_correct == E - 1, E + 1, last_correct + 2)
    df = pd.DataFrame({"example_id": data.example_id.numpy(), "group": data.group.astype(str), "ssft": ssft})
    return make_result(df, scores="ssft", forget_epochs=forget_epochs, fit_epochs=fit_epochs, seed=seed,
                       run=str(run.path), model=run.model_name, recipe=run.info.get("recipe", "given"),
                       config=cfg.to_dict())


def holdout_retraining(run, epochs: int = 5, seed: int = 0) -> pd.DataFrame:
    """Holdout retraining (Carlini et al. 2019): fine-tune the final model on held-out examples (the test
    split, true labels) for ``epochs`` epochs with the run's optimiser; ``holdout_kl(i)`` is the symmetric KL
    divergence between the predictive distributions of the original and fine-tuned models on training example
    i. Memorized examples move most. Columns: ``example_id, group, holdout_kl``."""
    from ..hooks import batched_forward

    cfg = run.config
    run.warn_default_recipe("holdout retraining")
    data = run.data()
    train, held = data.train, data.test
    if len(held) == 0:
        raise ValueError("Holdout retraining needs held-out (test) examples; this run has none.")

    def logp(model):
        return torch.cat([torch.log_softmax(out.double(), 1).cpu() for _, out in batched_forward(model, train.x, 2048)])

    p = logp(run.model())
    tuned = _fit(run.model(), held.x, held.y, epochs, cfg, seed)
    q = logp(tuned)
    kl = ((p.exp() * (p - q)).sum(1) + (q.exp() * (q - p)).sum(1)).numpy()
    df = pd.DataFrame({"example_id": train.example_id.numpy(), "group": train.group.astype(str), "holdout_kl": kl})
    return make_result(df, scores="holdout_retraining", epochs=epochs, seed=seed, held_out="test split",
                       run=str(run.path), model=run.model_name, recipe=run.info.get("recipe", "given"),
                       config=cfg.to_dict())
