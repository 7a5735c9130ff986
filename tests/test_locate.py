from dataclasses import replace

import numpy as np
import pytest
import torch

from memloc.hooks import SiteError
from memloc.locate import (ablate_examples, dropout_accuracies, find_units, greedy_flip, retrain_layer,
                           retrain_layers, rewind_layers, summarize_flips)
from memloc.models import build_model
from memloc.train import train


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bits_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ rewinding

def test_rewind_matches_the_checkpoints_it_rewinds_to(small_run):
    run = small_run
    final = run.epochs[-1]
    df = rewind_layers(run, epochs=[0, final], progress=False)
    acc = df.pivot_table(index=["layer", "epoch"], columns="group", values="accuracy")
    base = acc.loc[("none", final)]
    assert base["clean"] == 1.0 and base["noisy"] == 1.0
    for layer in run.model().layer_names:
        # rewinding to the final epoch changes nothing
        assert (acc.loc[(layer, final)] == base).all()
    # rewinding the head to initialisation destroys what it learned
    assert acc.loc[("layers.1", 0), "noisy"] < 0.3
    assert set(df.group) == {"clean", "noisy", "test"} and df.attrs["settings"]["include_buffers"] is True
    with pytest.raises(ValueError, match="saved epochs are"):
        rewind_layers(run, epochs=[999], progress=False)
    with pytest.raises(SiteError, match="its layers are"):
        rewind_layers(run, layers=["layers.7"], progress=False)


def test_rewinding_buffers_is_an_option_that_matters(tmp_path):
    run = train({"dataset": "digits", "dataset_kwargs": {"images": True}, "model": "cnn2d",
                 "model_kwargs": {"channels": [8, 8]}, "epochs": 3, "stop_at_train_acc": None, "lr": 0.01},
                tmp_path / "bn", progress=False)
    a = rewind_layers(run, layers=["layers.0"], epochs=[0], include_buffers=True, progress=False)
    b = rewind_layers(run, layers=["layers.0"], epochs=[0], include_buffers=False, progress=False)
    assert not np.allclose(a.accuracy.values, b.accuracy.values)
    assert b.attrs["settings"]["include_buffers"] is False


# ------------------------------------------------------------------------------------------------ retraining

def test_retraining_freezes_everything_else_and_trains_on_clean_only(small_run):
    run = small_run
    final, init = run.checkpoint(), run.checkpoint(0)
    rows, model = retrain_layer(run, "layers.1", max_epochs=3, patience=1)
    after = model.state_dict()
    for k in after:
        if k.startswith("layers.1."):
            assert not torch.equal(after[k], final[k]) and not torch.equal(after[k], init[k])
        else:
            assert torch.equal(after[k], final[k]), f"{k} was not frozen"
    last = {r["group"]: r["accuracy"] for r in rows if r["epoch"] == max(x["epoch"] for x in rows)}
    assert last["clean"] > 0.95
    # the head was retrained on clean examples only: the flipped labels are no longer predicted
    assert last["noisy"] < 0.5


def test_retrain_layers_result(small_run):
    df = retrain_layers(small_run, max_epochs=2, patience=1, progress=False)
    assert set(df.layer) == {"layers.0", "layers.1"} and df.epoch.min() == 0
    assert df.attrs["settings"]["trained_on"] == "clean" and df.attrs["settings"]["frozen_max_change"] == 0.0
    with pytest.raises(ValueError, match="'max_epochs' parameter"):
        retrain_layers(small_run, max_epochs=0, progress=False)


# ------------------------------------------------------------------------------------------------ ablation

@pytest.fixture(scope="module")
def double_run(small_run):
    model = small_run.model().double()
    data = small_run.data()
    return model, replace(data, x=data.x.double())


@pytest.mark.parametrize("kw", [{}, {"keep_weight": 0.0, "batch_size": 1}, {"noise_samples": 3, "batch_size": 16}])
def test_batched_ablation_picks_the_same_units_as_the_loop(double_run, small_run, kw):
    model, data = double_run
    ex = small_run.examples
    rng = np.random.default_rng(1)
    ids = list(rng.choice(ex.example_id[ex.group == "noisy"], 6, replace=False)) + \
        list(rng.choice(ex.example_id[ex.group == "clean"], 6, replace=False))
    a = greedy_flip(model, data, ids, progress=False, eval_size=200, max_rows=100, **kw)
    b = greedy_flip(model, data, ids, progress=False, eval_size=200, method="loop", **kw)
    assert list(a.units) == list(b.units)
    assert np.allclose(a.test_acc_change, b.test_acc_change) and np.allclose(a.clean_acc_change, b.clean_acc_change)
    assert a.flipped.all() and (a.final_prediction != a.label).all()


def test_ablation_restores_the_model_and_the_flip_is_real(small_run):
    model, data = small_run.model(), small_run.data()
    before = _state(model)
    ids = small_run.examples.query("group == 'noisy'").example_id[:5].tolist()
    df = greedy_flip(model, data, ids, progress=False)
    assert _bits_equal(before, _state(model))
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    # zeroing the reported units' parameters for real flips each example
    units = find_units(model)
    for eid, names in zip(df.example_id, df.units):
        values = {}
        for name in names:
            layer, idx = name.split(":")
            for sub in units.submodules[layer]:
                for pn, p in dict(model.named_modules())[sub].named_parameters(recurse=False):
                    key = f"{sub}.{pn}"
                    v = values.get(key, p.detach().clone())
                    v[int(idx)] = 0
                    values[key] = v
        x = data.by_ids([eid])
        from memloc.hooks import replace_parameters
        with replace_parameters(model, values), torch.no_grad():
            assert model(x.x).argmax(1).item() != x.y.item()
        with torch.no_grad():
            assert model(x.x).argmax(1).item() == x.y.item()


def test_ablation_cap_is_reported(small_run):
    model, data = small_run.model(), small_run.data()
    ids = small_run.examples.query("group == 'clean'").example_id[:20].tolist()
    df = greedy_flip(model, data, ids, max_units=1, progress=False, eval_size=0)
    assert (df.n_units <= 1).all() and df.capped.any()
    assert (df.capped == ~df.flipped).all() and df.clean_acc_change.isna().all()


def test_noisy_examples_are_flipped_by_fewer_units_at_lower_cost(small_run):
    df = ablate_examples(small_run, n_per_group=40, progress=False, eval_size=300)
    s = summarize_flips(df)
    assert s["noisy"]["median_units"] < s["clean"]["median_units"]
    assert s["mannwhitney_p_noisy_fewer"] < 0.01
    assert s["noisy"]["mean_test_acc_change"] > s["clean"]["mean_test_acc_change"]
    assert df.attrs["settings"]["n_per_group"] == 40 and "config" in df.attrs["settings"]


def test_ablation_bad_input(small_run):
    model, data = small_run.model(), small_run.data()
    with pytest.raises(KeyError, match="not training examples"):
        greedy_flip(model, data, [int(data.test.example_id[0])], progress=False)
    with pytest.raises(ValueError, match="'max_units' parameter must be an int"):
        greedy_flip(model, data, [0], max_units=0, progress=False)
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        greedy_flip(model, data, [0], progress=False)
    resnet = build_model("resnet9", (3, 16, 16), 4, width=0.0625)
    with pytest.raises(SiteError, match="mixes parameter output sizes|pick a sub-layer"):
        find_units(resnet, ["layers"])
    assert find_units(resnet).total == sum(find_units(resnet).sizes)


def test_ablation_on_resnet9_units_are_channels():
    resnet = build_model("resnet9", (3, 16, 16), 4, width=0.0625).eval()
    u = find_units(resnet)
    assert u.layers == resnet.layer_names[:-1] and u.sizes == [4, 8, 8, 8, 16, 16, 16, 8]  # the head only if asked
    assert find_units(resnet, resnet.layer_names).sizes[-1] == 4
    assert u.submodules["layers.0"] == ["layers.0.conv", "layers.0.bn"]


# ------------------------------------------------------------------------------------------------ example-tied dropout

def test_example_tied_dropout_masks_are_per_example_and_fixed(tmp_path):
    from memloc.models.dropout import ExampleTiedDropout

    etd = ExampleTiedDropout(["layers.0"], n_examples=50, p_fixed=0.25, p_mem=0.5, seed=3)
    m1 = etd.mask("layers.0", 16)
    assert m1.dtype == torch.bool and m1.shape == (50, 12)
    assert torch.equal(m1, ExampleTiedDropout(["layers.0"], 50, 0.25, 0.5, seed=3).mask("layers.0", 16))
    assert len({tuple(r.tolist()) for r in m1}) > 40  # examples get different masks
    model = build_model("mlp", (5,), 3, seed=0, hidden=[16]).eval()
    x = torch.randn(4, 5)
    ids = torch.tensor([0, 7, 7, 20])
    with etd.apply(model, "train", ids=ids):
        from memloc.hooks import capture
        h = capture(model, x, "layers.0")["layers.0"]
    plain = capture(model, x, "layers.0")["layers.0"]
    assert torch.equal(h[:, :4], plain[:, :4])  # generalization units untouched
    for r, i in enumerate(ids):
        assert torch.equal(h[r, 4:], plain[r, 4:] * m1[i])
    with etd.apply(model, "drop"):
        d = capture(model, x, "layers.0")["layers.0"]
    assert torch.all(d[:, 4:] == 0) and torch.allclose(d[:, :4], plain[:, :4] * (0.25 + 0.5) / 0.25)
    with pytest.raises(ValueError, match="needs the batch's example ids"):
        with etd.apply(model, "train"):
            pass
    # the masks used in training are the same in every epoch: a run with ETD resumes bit for bit
    cfg = {"dataset": "digits", "model": "mlp", "model_kwargs": {"hidden": [64]}, "epochs": 4,
           "stop_at_train_acc": None, "example_tied_dropout": {"p_fixed": 0.5, "p_mem": 0.2}}
    full = train(cfg, tmp_path / "full", progress=False)

    def die(epoch, _):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, on_epoch_end=die)
    assert _bits_equal(train(cfg, tmp_path / "cut", progress=False).checkpoint(), full.checkpoint())


def test_dropping_memorization_units_removes_memorized_labels(tmp_path):
    run = train({"dataset": "digits", "model": "mlp", "model_kwargs": {"hidden": [256, 256]}, "lr": 3e-3,
                 "epochs": 60, "batch_size": 64, "example_tied_dropout": {}}, tmp_path / "etd", progress=False)
    df = dropout_accuracies(run)
    acc = df.pivot(index="mode", columns="group", values="accuracy")
    assert acc.loc["own", "noisy"] == 1.0 and acc.loc["own", "clean"] == 1.0
    assert acc.loc["drop", "noisy"] < 0.35
    assert acc.loc["drop", "test"] > acc.loc["expect", "test"] - 0.05
    assert df.attrs["settings"]["sites"] == ["layers.1"]
    with pytest.raises(ValueError, match="without example-tied dropout"):
        dropout_accuracies(train({"dataset": "digits", "model": "mlp", "epochs": 1}, tmp_path / "plain",
                                 progress=False))


@pytest.mark.parametrize("kind", ["resnet9", "user"])
def test_batched_equals_loop_on_resnet9_and_user_models(kind):
    from torch import nn

    from memloc.data import from_arrays

    g = torch.Generator().manual_seed(0)
    if kind == "resnet9":
        model = build_model("resnet9", (3, 12, 12), 4, seed=0, width=0.0625)
        x = torch.randn(40, 3, 12, 12, generator=g)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
        x = torch.randn(40, 6, generator=g)
    model = model.double()
    y = torch.randint(0, 4, (40,), generator=g)
    # make BatchNorm statistics non-trivial, then evaluate
    model.train()
    with torch.no_grad():
        model(x.double())
    model.eval()
    with torch.no_grad():
        y = model(x.double()).argmax(1)  # targets start correctly classified
    data = from_arrays(x.double().numpy(), y.numpy(), num_classes=4)
    data = replace(data, x=data.x.double())
    ids = list(range(8))
    a = greedy_flip(model, data, ids, batch_size=8, progress=False, eval_size=0, max_rows=24)
    b = greedy_flip(model, data, ids, batch_size=8, progress=False, eval_size=0, method="loop")
    assert list(a.units) == list(b.units) and a.n_units.sum() > 0
