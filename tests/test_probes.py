import numpy as np
import pytest

from memloc.analyses import probes
from memloc.train import train


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, small_config):
    return train(dict(small_config, noise=0.0), tmp_path_factory.mktemp("runs") / "clean", progress=False)


def test_compare_layers_self_and_against_clean(small_run, clean_run):
    self_sim = probes.compare_layers(small_run, method="cka", progress=False, max_examples=500)
    diag = self_sim[self_sim.layer_a == self_sim.layer_b]
    assert np.allclose(diag.similarity, 1.0)
    assert len(self_sim) == len(small_run.model().layer_names) ** 2
    same = probes.compare_layers(small_run, clean_run, "cka", cross=False, progress=False, max_examples=500)
    assert list(same.layer_a) == list(same.layer_b) == small_run.model().layer_names
    assert same.similarity.between(0, 1).all() and (same.similarity < 0.999).any()
    assert same.attrs["settings"]["config_b"]["noise"] == 0.0 and same.attrs["settings"]["n_examples"] == 500


def test_checkpoint_similarity_reaches_one_at_the_end(small_run):
    last = small_run.epochs[-1]
    df = probes.checkpoint_similarity(small_run, "cka", epochs=[0, last], progress=False, max_examples=400)
    assert np.allclose(df[df.epoch == last].similarity, 1.0)
    assert (df[df.epoch == 0].similarity < 0.99).all()


def test_layer_dimensions_by_group(small_run):
    df = probes.layer_dimensions(small_run, max_examples=600)
    assert set(df.group) == {"all", "clean", "noisy"}
    assert (df.dimension > 0).all() and (df[df.group == "noisy"].n_points + df[df.group == "noisy"].n_duplicates == 144).all()
    assert df.attrs["settings"]["estimator"] == "twonn"


def test_knn_probe_sees_memorization_only_late(small_run):
    df = probes.knn_probe(small_run, k=5)
    flipped = df[(df.group == "noisy") & (df.target == "flipped")].set_index("layer").accuracy
    original = df[(df.group == "noisy") & (df.target == "original")].set_index("layer").accuracy
    layers = small_run.model().layer_names
    # the hidden layer still groups flipped examples with their true class; the logits follow the flipped label
    assert original[layers[0]] > flipped[layers[0]]
    assert flipped[layers[-1]] > flipped[layers[0]]
    assert df[df.group == "test"].accuracy.min() > 0.5


def test_geometric_memorization(small_run, tmp_path):
    nc = probes.neural_collapse_memorization(small_run, epochs=[0, small_run.epochs[-1]])
    assert list(nc.columns) == ["epoch", "total", "mean", "clean_mean", "n_noisy"]
    assert nc.n_noisy.iloc[0] == 144 and np.isclose(nc.total.iloc[1], nc["mean"].iloc[1] * 144)
    random = train({"dataset": "digits", "model": "mlp", "model_kwargs": {"hidden": [64]}, "noise": 0.9,
                    "epochs": 3, "stop_at_train_acc": None}, tmp_path / "random", progress=False)
    bm = probes.benign_memorization(random, k=5, max_examples=500)
    assert set(bm.epoch) == {0, 3} and len(bm) == 4 and bm.accuracy.between(0, 1).all()


def test_probe_cli(small_run, clean_run, tmp_path, capsys):
    from memloc.cli import main

    out = tmp_path / "p"
    assert main(["probe", str(small_run.path), "--against", str(clean_run.path), "--max-examples", "300",
                 "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "similarity of A and B at the same layer" in text and "intrinsic dimension" in text
    for name in ("similarity", "same_layer", "dynamics", "dimension", "knn", "collapse"):
        assert (out / f"{name}.parquet").exists(), name
    assert (out / "similarity.png").read_bytes()[:4] == b"\x89PNG"
