"""Layer-wise representation probes on runs: similarity, dynamics, intrinsic dimension, k-NN probes and the
geometric definitions of memorization.

Every function takes :class:`~memloc.train.Run` objects, captures the outputs of the run's layers
(``layer_names(model, head=True)``: block outputs after the non-linearity, the head's logits) for a fixed, seeded sample of
examples, flattens them to examples x features, and returns a tidy result whose settings say which examples,
layers, epochs and estimator produced it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..hooks import capture
from ..models import layer_names
from ..results import make_result
from .dimension import ESTIMATORS
from .similarity import METHODS

__all__ = ["sample_ids", "layer_activations", "compare_layers", "checkpoint_similarity", "layer_dimensions",
           "knn_probe", "neural_collapse_memorization", "benign_memorization"]


def sample_ids(run, split: str = "train", max_examples: int | None = 2000, seed: int = 0,
               groups: Sequence[str] | None = None) -> np.ndarray:
    """A seeded, sorted sample of example ids of ``split`` (``train``, ``test`` or ``all``), optionally of groups.
    ``max_examples``: at least 20 (fewer leaves too few points for any probe), or ``None`` for all."""
    from ..validate import number

    number("max_examples", max_examples, lo=20, integer=True, none_ok=True)
    ex = run.examples
    if split != "all":
        if split not in ("train", "test"):
            raise ValueError(f"The 'split' parameter must be 'train', 'test' or 'all'. Got {split!r} instead.")
        ex = ex[ex.split == split]
    if groups is not None:
        ex = ex[ex.group.isin(groups)]
    ids = ex.example_id.to_numpy()
    if max_examples is not None and len(ids) > max_examples:
        ids = np.random.default_rng(seed).choice(ids, max_examples, replace=False)
    return np.sort(ids)


def layer_activations(run, ids, layers: Sequence[str] | None = None, epoch: int | None = None,
                      batch_size: int = 1024) -> dict[str, np.ndarray]:
    """``{layer: [len(ids), features]}`` float64 activations of the run's model at ``epoch`` (default: last)."""
    model = run.model(epoch)
    layers = list(layers or layer_names(model, head=True))
    data = run.data().by_ids(ids)
    acts = capture(model, data, layers, batch_size=batch_size, reduce=lambda a: a.flatten(1))
    return {k: v.double().numpy() for k, v in acts.items()}


def _method_fn(method: str, kwargs: dict):
    if method not in METHODS:
        raise ValueError(f"Unknown similarity method {method!r}; valid methods are {sorted(METHODS)}.")
    return lambda a, b: METHODS[method](a, b, **kwargs)


def compare_layers(run_a, run_b=None, method: str = "cka", layers_a=None, layers_b=None, epoch_a=None, epoch_b=None,
                   cross: bool = True, split: str = "train", max_examples: int | None = 2000, seed: int = 0,
                   progress: bool = True, **method_kwargs) -> pd.DataFrame:
    """Similarity of every layer of model A with every layer of model B (``cross=True``) or layer by layer.

    ``run_b=None`` compares A with itself (at ``epoch_b``). Both models see the same examples (the runs must
    share their example ids, e.g. the same dataset with different label noise). Rows: ``layer_a, layer_b,
    method, similarity``.
    """
    run_b = run_a if run_b is None else run_b
    ids = sample_ids(run_a, split, max_examples, seed)
    missing = np.setdiff1d(ids, run_b.examples.example_id)
    if len(missing):
        raise ValueError(f"Run {run_b.path} lacks example ids {missing[:5].tolist()}: compare runs on the same data.")
    A = layer_activations(run_a, ids, layers_a, epoch_a)
    B = layer_activations(run_b, ids, layers_b, epoch_b)
    fn = _method_fn(method, method_kwargs)
    pairs = [(a, b) for a in A for b in B] if cross else list(zip(A, B))
    rows = []
    for a, b in tqdm(pairs, desc=f"{method} layer pairs", disable=not progress, leave=False):
        rows.append({"layer_a": a, "layer_b": b, "method": method, "similarity": fn(A[a], B[b])})
    return make_result(pd.DataFrame(rows), analysis="compare_layers", run_a=str(run_a.path), run_b=str(run_b.path),
                       method=method, method_kwargs=method_kwargs, epoch_a=epoch_a, epoch_b=epoch_b, split=split,
                       n_examples=len(ids), seed=seed, config=run_a.config.to_dict(),
                       config_b=run_b.config.to_dict())


def checkpoint_similarity(run, method: str = "svcca", layers=None, epochs=None, split: str = "train",
                          max_examples: int | None = 2000, seed: int = 0, progress: bool = True,
                          **method_kwargs) -> pd.DataFrame:
    """Similarity of each layer at each checkpoint with the same layer of the final model (SVCCA dynamics,
    Raghu et al. 2017: which layers settle first). Rows: ``layer, epoch, method, similarity``."""
    ids = sample_ids(run, split, max_examples, seed)
    final = layer_activations(run, ids, layers)
    epochs = list(run.epochs if epochs is None else epochs)
    fn = _method_fn(method, method_kwargs)
    rows = []
    for e in tqdm(epochs, desc="checkpoints", disable=not progress, leave=False):
        acts = layer_activations(run, ids, list(final), e)
        for layer in final:
            rows.append({"layer": layer, "epoch": e, "method": method, "similarity": fn(acts[layer], final[layer])})
    return make_result(pd.DataFrame(rows), analysis="checkpoint_similarity", run=str(run.path), method=method,
                       method_kwargs=method_kwargs, epochs=epochs, split=split, n_examples=len(ids), seed=seed,
                       config=run.config.to_dict())


def layer_dimensions(run, layers=None, estimator: str = "twonn", groups: Sequence[str] = ("all", "clean", "noisy"),
                     epoch: int | None = None, max_examples: int | None = 2000, seed: int = 0,
                     **estimator_kwargs) -> pd.DataFrame:
    """Intrinsic dimension of each layer's representation, over all training examples and per group.

    Rows: ``layer, group, estimator, dimension, n_points, n_duplicates``. Each group is sampled separately
    (at most ``max_examples`` points), so the small noisy group is used whole.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {estimator!r}; valid estimators are {sorted(ESTIMATORS)}.")
    rows = []
    for g in groups:
        sel = None if g == "all" else [g]
        split = "test" if g == "test" else "train"
        ids = sample_ids(run, split, max_examples, seed, groups=sel)
        if len(ids) < 4:
            continue
        acts = layer_activations(run, ids, layers, epoch)
        for layer, a in acts.items():
            est = ESTIMATORS[estimator](**estimator_kwargs).fit(a)
            rows.append({"layer": layer, "group": g, "estimator": estimator, "dimension": est.dimension_,
                         "n_points": est.n_points_, "n_duplicates": est.n_duplicates_})
    return make_result(pd.DataFrame(rows), analysis="layer_dimensions", run=str(run.path), estimator=estimator,
                       estimator_kwargs=estimator_kwargs, epoch=epoch, max_examples=max_examples, seed=seed,
                       duplicates="dropped exact duplicate rows", config=run.config.to_dict())


def knn_probe(run, layers=None, k: int = 10, epoch: int | None = None, max_examples: int | None = 2000,
              seed: int = 0) -> pd.DataFrame:
    """k-nearest-neighbour probe per layer, fitted on *clean* training examples with their labels.

    Evaluated on test examples (true labels) and on noisy training examples against their *original* label
    (is the class structure still there for memorized examples?) and their flipped label. Rows: ``layer,
    group, target, accuracy, n``.
    """
    from sklearn.neighbors import KNeighborsClassifier

    ex = run.examples.set_index("example_id")
    fit_ids = sample_ids(run, "train", max_examples, seed, groups=["clean"])
    test_ids = sample_ids(run, "test", max_examples, seed)
    noisy_ids = sample_ids(run, "train", max_examples, seed, groups=["noisy"])
    all_ids = np.concatenate([fit_ids, test_ids, noisy_ids])
    acts = layer_activations(run, all_ids, layers, epoch)
    nf, nt = len(fit_ids), len(test_ids)
    rows = []
    for layer, a in acts.items():
        clf = KNeighborsClassifier(n_neighbors=k).fit(a[:nf], ex.loc[fit_ids, "label"].to_numpy())
        pt = clf.predict(a[nf:nf + nt])
        rows.append({"layer": layer, "group": "test", "target": "true", "n": nt,
                     "accuracy": float((pt == ex.loc[test_ids, "label"].to_numpy()).mean())})
        if len(noisy_ids):
            pn = clf.predict(a[nf + nt:])
            for target, col in (("original", "original_label"), ("flipped", "label")):
                rows.append({"layer": layer, "group": "noisy", "target": target, "n": len(noisy_ids),
                             "accuracy": float((pn == ex.loc[noisy_ids, col].to_numpy()).mean())})
    return make_result(pd.DataFrame(rows), analysis="knn_probe", run=str(run.path), k=k, epoch=epoch,
                       fit_on="clean training examples", n_fit=nf, seed=seed, config=run.config.to_dict())


def neural_collapse_memorization(run, epochs=None) -> pd.DataFrame:
    """Neural-collapse memorization (Nguyen et al. 2023) per checkpoint.

    Penultimate features (the input of the last layer) of the flipped examples, and the distance of each to
    the mean test feature of its *true* class: ``total`` is the sum (their definition), ``mean`` the average;
    ``clean_mean`` is the same for clean training examples, as a reference. Rows: ``epoch, total, mean,
    clean_mean, n_noisy``.
    """
    ex = run.examples
    data = run.data()
    head = layer_names(run.model(), head=True)[-1]
    epochs = list(run.epochs if epochs is None else epochs)
    groups = {"noisy": ex.group.to_numpy() == "noisy", "clean": ex.group.to_numpy() == "clean",
              "test": ex.group.to_numpy() == "test"}
    orig = ex.original_label.to_numpy()
    rows = []
    for e in epochs:
        feats = capture(run.model(e), data, head, inputs=True, reduce=lambda a: a.flatten(1))[head].double().numpy()
        means = {c: feats[groups["test"] & (orig == c)].mean(0) for c in np.unique(orig[groups["test"]])}

        def dist(mask):
            return np.array([np.linalg.norm(f - means[c]) for f, c in zip(feats[mask], orig[mask]) if c in means])

        dn, dc = dist(groups["noisy"]), dist(groups["clean"])
        rows.append({"epoch": e, "total": float(dn.sum()), "mean": float(dn.mean()) if len(dn) else np.nan,
                     "clean_mean": float(dc.mean()), "n_noisy": int(len(dn))})
    return make_result(pd.DataFrame(rows), analysis="neural_collapse_memorization", run=str(run.path), layer=head,
                       features="input of the last layer", config=run.config.to_dict())


def benign_memorization(run, layers=None, k: int = 10, max_examples: int | None = 2000, seed: int = 0) -> pd.DataFrame:
    """Benign memorization (Anagnostidis et al. 2023): k-NN probe accuracy on clean test data, per layer, of the
    trained network against the same probe at initialization. Meant for a run trained on (mostly) random
    labels (e.g. ``noise=0.9``): the probe is fitted with the *original* labels of training examples. Rows:
    ``layer, epoch, accuracy``."""
    from sklearn.neighbors import KNeighborsClassifier

    ex = run.examples.set_index("example_id")
    fit_ids = sample_ids(run, "train", max_examples, seed)
    test_ids = sample_ids(run, "test", max_examples, seed)
    rows = []
    for e in (run.epochs[0], run.epochs[-1]):
        acts = layer_activations(run, np.concatenate([fit_ids, test_ids]), layers, e)
        for layer, a in acts.items():
            clf = KNeighborsClassifier(n_neighbors=k).fit(a[:len(fit_ids)], ex.loc[fit_ids, "original_label"])
            acc = float((clf.predict(a[len(fit_ids):]) == ex.loc[test_ids, "label"].to_numpy()).mean())
            rows.append({"layer": layer, "epoch": e, "accuracy": acc})
    return make_result(pd.DataFrame(rows), analysis="benign_memorization", run=str(run.path), k=k, seed=seed,
                       labels_for_probe="original", noise=run.config.noise, config=run.config.to_dict())
