import numpy as np
import pandas as pd
import pytest
import torch

import memloc.edit.unlearn as U
from memloc.edit.unlearn import (METHODS, ClassifierTask, compare_unlearning, forget_split, train_oracle,
                                 unlearn)
from memloc.hooks import ablate
from memloc.models import build_model

FAST = {"grad_ascent": {"steps": 20}, "grad_diff": {"steps": 20, "kl_weight": 1.0}, "npo": {"steps": 20},
        "finetune": {"steps": 20}, "reset_finetune": {"steps": 20}, "random_reset": {"steps": 20},
        "zero_units": {"n_units": 4}}


@pytest.fixture(scope="module")
def setup(small_run):
    data = small_run.data()
    return small_run, ClassifierTask(data), forget_split(data, "noisy")


@pytest.fixture(scope="module")
def oracle(setup, tmp_path_factory):
    run, _, split = setup
    return train_oracle(run, split.forget, tmp_path_factory.mktemp("unlearn") / "oracle", progress=False)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(a, b):
    return {k for k in a if not torch.equal(a[k], b[k])}


def _accuracy(model, task, ids):
    return task.per_example(model, ids).acc.mean()


def test_splits_and_bad_input_are_explained(setup):
    run, task, split = setup
    data = task.data
    assert set(split.forget) == set(data.example_id.numpy()[data.group == "noisy"])
    assert not set(split.forget) & set(split.retain)
    assert set(split.forget) | set(split.retain) == set(task.train_ids) and set(split.holdout) == set(task.test_ids)
    chosen = forget_split(data, [int(split.retain[0]), int(split.retain[1])])
    assert list(chosen.forget) == sorted(split.retain[:2].tolist()) and chosen.name.startswith("ids-")
    model = run.model()
    with pytest.raises(ValueError, match="valid methods are .*grad_ascent.*random_reset"):
        unlearn(model, task, split.forget, split.retain, "forget_everything")
    with pytest.raises(ValueError, match="not training examples; valid forget ids"):
        forget_split(data, [int(task.test_ids[0])])
    with pytest.raises(ValueError, match="forget set is empty"):
        forget_split(data, [])
    with pytest.raises(ValueError, match="forget set is empty"):
        unlearn(model, task, [], split.retain, "finetune")
    with pytest.raises(ValueError, match="'noisy' or a list"):
        forget_split(data, "clean")
    with pytest.raises(ValueError, match="Unknown parameter.*'stepz'.*its parameters are"):
        unlearn(model, task, split.forget, split.retain, "npo", stepz=3)
    with pytest.raises(ValueError, match="overlap"):
        unlearn(model, task, split.forget, split.forget, "finetune")
    with pytest.raises(ValueError, match="valid methods are"):
        compare_unlearning(run, methods=["npo", "oops"], progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_changes_only_what_it_claims(setup, method):
    run, task, split = setup
    model = run.model()
    before = _state(model)
    new, rec = unlearn(model, task, split.forget, split.retain, method, seed=1, **FAST[method])
    assert _changed(before, _state(model)) == set(), "the input model was modified"
    after = _state(new)
    changed = _changed(before, after)
    claimed = set(rec["changed"]["parameters"]) | set(rec["changed"]["buffers"])
    assert changed and changed <= claimed
    assert rec["method"] == method and rec["seed"] == 1
    if method in ("reset_finetune", "random_reset", "zero_units"):
        units = rec["units"]
        n = sum(len(v) for v in units.values())
        assert n == (4 if method == "zero_units" else round(0.3 * 256))
        rows = torch.zeros(256, dtype=torch.bool)
        rows[units["layers.0"]] = True
        for k in ("layers.0.linear.weight", "layers.0.linear.bias"):
            moved = (before[k] != after[k]).reshape(256, -1).any(1)
            assert not moved[~rows].any(), f"{method} moved units it did not choose in {k}"
            assert moved[rows].all(), f"{method} left a chosen unit of {k} untouched"
            assert rec["changed"]["entries"][k] == int(rows.sum()) * before[k][0].numel()
        if method == "zero_units":  # zeroed, nothing else (the head untouched), and the same as hooks.ablate
            assert changed == {"layers.0.linear.weight", "layers.0.linear.bias"}
            assert (after["layers.0.linear.weight"][rows] == 0).all()
            x = task.batch(split.retain[:100])["x"]
            with torch.no_grad(), ablate(model, units):
                expect = model(x)
            assert torch.equal(new(x), expect)
        else:  # the head is always trainable
            assert {"layers.1.weight", "layers.1.bias"} <= set(rec["changed"]["parameters"])
            assert rec["head"] == "layers.1"
    else:
        assert set(rec["changed"]["parameters"]) == set(dict(model.named_parameters()))


def test_batchnorm_buffers_are_claimed_and_frozen_channels_stay(digits):
    """A BatchNorm model (untrained is enough): reset_finetune moves only masked channels, the head and the
    normalisation statistics of the layers it trains."""
    data = digits
    model = build_model("cnn1d", data.input_shape, data.num_classes, seed=0, channels=[8, 8]).eval()
    task = ClassifierTask(data)
    split = forget_split(data, task.train_ids[:30])
    before = _state(model)
    new, rec = unlearn(model, task, split.forget, split.retain, "reset_finetune", steps=5, fraction=0.25)
    after = _state(new)
    changed = _changed(before, after)
    assert changed <= set(rec["changed"]["parameters"]) | set(rec["changed"]["buffers"])
    assert any("running_mean" in k for k in changed) and all(k in rec["changed"]["buffers"] for k in changed
                                                              if "running" in k or "num_batches" in k)
    for layer, idx in rec["units"].items():
        keep = torch.ones(8, dtype=torch.bool)
        keep[idx] = False
        for k in (f"{layer}.conv.weight", f"{layer}.bn.weight", f"{layer}.bn.bias"):
            assert torch.equal(before[k][keep], after[k][keep])
    assert _changed(before, _state(model)) == set()


def test_zero_units_takes_example_tied_dropout_memorization_units(setup):
    from memloc.models.dropout import ExampleTiedDropout

    run, task, split = setup
    etd = ExampleTiedDropout(["layers.0"], int(task.data.example_id.max()) + 1, seed=0)
    new, rec = unlearn(run.model(), ClassifierTask(task.data, etd=etd), split.forget, split.retain, "zero_units")
    assert rec["source"] == "etd" and rec["units"] == {"layers.0": list(range(51, 256))}
    assert (new.layers[0].linear.weight[51:] == 0).all() and (new.layers[0].linear.weight[:51] != 0).any()


def test_methods_are_seeded(setup):
    run, task, split = setup
    model = run.model()
    for method in ("random_reset", "grad_diff", "reset_finetune"):
        a = _state(unlearn(model, task, split.forget, split.retain, method, seed=5, steps=10)[0])
        b = _state(unlearn(model, task, split.forget, split.retain, method, seed=5, steps=10)[0])
        c = _state(unlearn(model, task, split.forget, split.retain, method, seed=6, steps=10)[0])
        assert _changed(a, b) == set(), method
        assert _changed(a, c), method
    # the global random state is not touched
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    unlearn(model, task, split.forget, split.retain, "random_reset", seed=5, steps=2)
    assert torch.equal(torch.rand(3), x)


def test_oracle_never_saw_the_forget_set(setup, oracle):
    run, task, split = setup
    seen = oracle.data()
    trained_on = seen.example_id.numpy()[seen.split == "train"]
    assert not np.isin(split.forget, trained_on).any()
    assert np.array_equal(np.sort(trained_on), split.retain)
    assert oracle.summary["unlearn_oracle"]["excluded_ids"] == split.forget.tolist()
    assert oracle.config.seed == run.config.seed and oracle.config.lr == run.config.lr
    # the original memorized the flipped labels; the oracle, never shown them, predicts the true ones
    assert _accuracy(run.model(), task, split.forget) == 1.0
    assert _accuracy(oracle.model(), task, split.forget) < 0.1
    assert task.per_example(oracle.model(), split.forget).acc_original.mean() > 0.8
    # reused, not retrained
    again = train_oracle(run, split.forget, oracle.path, progress=False)
    assert again.summary["seconds"] == oracle.summary["seconds"]


def test_gradient_ascent_collapses_retain_accuracy_unlike_grad_diff(setup):
    run, task, split = setup
    ga, _ = unlearn(run.model(), task, split.forget, split.retain, "grad_ascent", steps=100)
    gd, _ = unlearn(run.model(), task, split.forget, split.retain, "grad_diff", steps=100)
    ga_acc, gd_acc = _accuracy(ga, task, split.retain), _accuracy(gd, task, split.retain)
    assert ga_acc < 0.3 and gd_acc > ga_acc + 0.2
    assert _accuracy(ga, task, split.forget) < 0.3


def test_localized_reset_forgets_more_than_a_random_mask_of_the_same_size(setup):
    run, task, split = setup
    model = run.model()
    kw = dict(steps=100, fraction=0.3)
    deli, rec_d = unlearn(model, task, split.forget, split.retain, "reset_finetune", **kw)
    rand, rec_r = unlearn(model, task, split.forget, split.retain, "random_reset", **kw)
    assert rec_d["changed"]["entries"] == rec_r["changed"]["entries"]  # same size
    assert rec_d["units"] != rec_r["units"]
    f_d, f_r = _accuracy(deli, task, split.forget), _accuracy(rand, task, split.forget)
    assert f_d < f_r - 0.08
    assert _accuracy(deli, task, split.retain) > 0.97


def test_compare_uses_the_oracle_is_resumable_and_plots(setup, oracle, tmp_path, monkeypatch):
    run, task, split = setup
    out = tmp_path / "unlearn"
    # the comparison trains its own oracle into out/noisy/oracle: put the fixture's there to save time
    import shutil
    shutil.copytree(oracle.path, out / "noisy" / "oracle")
    methods = ["grad_ascent", "npo", "zero_units"]
    params = {m: FAST[m] for m in methods}
    table = compare_unlearning(run, "noisy", methods, out=out, params=params, progress=False)
    assert list(table.method) == ["original", "oracle"] + methods
    s = table.attrs["settings"]
    assert s["oracle"] == str(out / "noisy" / "oracle") and s["ks_can_tell"] and s["ks_power_p"] < 0.05
    row = table.set_index("method")
    o = task.per_example(oracle.model(), split.forget)
    assert row.loc["oracle", "forget_acc"] == pytest.approx(o.acc.mean())
    assert row.loc["original", "forget_acc"] == 1.0 and row.loc["oracle", "forget_acc"] < 0.1
    assert row.loc["original", "mia_auc"] > 0.9 and abs(row.loc["oracle", "mia_auc"] - 0.5) < 0.1
    assert (out / "noisy" / "table.parquet").exists() and (out / "noisy" / "tradeoff.png").stat().st_size > 1000
    # resumable: finished rows are reused, changed parameters recomputed
    calls = []
    real = U.unlearn
    monkeypatch.setattr(U, "unlearn", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    again = compare_unlearning(run, "noisy", methods, out=out, params={**params, "npo": {"steps": 21}},
                               progress=False)
    assert calls == ["npo"]
    pd.testing.assert_frame_equal(again[again.method != "npo"].reset_index(drop=True),
                                  table[table.method != "npo"].reset_index(drop=True))


def test_cli_prints_the_table_with_its_settings(small_run, tmp_path, capsys):
    from memloc.cli import main

    out = tmp_path / "ul"
    assert main(["unlearn", str(small_run.path), "--method", "npo,finetune", "--param", "npo.steps=5",
                 "--param", "finetune.steps=5", "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    for needle in ("oracle:", "power check", '"steps": 5', "original", "finetune", "tradeoff.png"):
        assert needle in text
    assert (out / "noisy" / "rows" / "npo.parquet").exists()
    assert main(["unlearn", str(small_run.path), "--method", "nope", "--out", str(out), "--quiet"]) == 2
    assert "valid methods are" in capsys.readouterr().err


def test_relearning_attack_brings_back_what_gradient_ascent_hid_but_not_what_the_oracle_never_saw(setup, oracle):
    from memloc.edit.unlearn import relearn, relearn_row, relearn_sets

    run, task, split = setup
    sets = relearn_sets(split.forget, split.retain, 0.5, seed=0)
    assert not set(sets["relearn"]) & set(sets["held"])
    assert sorted([*sets["relearn"], *sets["held"]]) == sorted(split.forget)
    assert len(sets["retain"]) == len(sets["relearn"]) and set(sets["retain"]) <= set(split.retain)
    o = oracle.model()
    before = _state(o)
    moved = relearn(o, task, sets["relearn"], steps=5)
    assert not _changed(before, _state(o)) and _changed(before, _state(moved))  # the input model is untouched
    ga, _ = unlearn(run.model(), task, split.forget, split.retain, "grad_ascent", steps=20)
    r_o, r_ga = relearn_row(o, task, split, {}), relearn_row(ga, task, split, {})
    # the oracle never saw the flipped labels: relearning half of them teaches nothing about the other half
    assert r_o["relearn_forget_acc_held"] <= r_o["forget_acc_held_before"] + 0.05
    # gradient ascent only hid them: 20 steps on half of them bring the other half back
    assert r_ga["relearn_forget_acc_held"] > r_ga["forget_acc_held_before"] + 0.2
    assert r_ga["relearn_forget_acc_held"] > r_o["relearn_forget_acc_held"] + 0.5
