"""Your own classifier: a model class defined here (BatchNorm, a residual block, its own module names), trained
in a plain loop that writes ``torch.save`` state dicts, and every run-level method of memloc on it."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memloc
from memloc.analyses import probes, scores
from memloc.analyses.privacy import membership_inference
from memloc.edit.unlearn import compare_unlearning
from memloc.ensemble import train_ensemble
from memloc.locate import ablate_examples, greedy_flip, retrain_layers, rewind_layers, summarize_flips

EPOCHS = 40
RECIPE = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 64, "epochs": EPOCHS, "seed": 0}


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class DigitNet(nn.Module):
    instances = 0  # counts every construction: memloc must only ever build this class for this run

    def __init__(self, width=16):
        super().__init__()
        DigitNet.instances += 1
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.res = ResBlock(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, x):
        return self.classifier(self.pool(self.down(self.res(self.stem(x.view(-1, 1, 8, 8))))).flatten(1))


def _user_data():
    """sklearn digits, the user's own split and 10% of the labels flipped by the user's own code."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16).astype(np.float32), d.target
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    tr, te = perm[:1400], perm[1400:]
    noisy = y[tr].copy()
    flip = rng.choice(1400, 140, replace=False)
    noisy[flip] = (noisy[flip] + rng.integers(1, 10, 140)) % 10
    return x[tr], noisy, y[tr], x[te], y[te]


def _user_loop(xtr, ytr, folder=None, make_recorder=None, ids=None):
    """The user's training loop: SGD, their own shuffling (the same as memloc.train's, so the two agree)."""
    torch.manual_seed(0)
    model = DigitNet()
    recorder = make_recorder(model) if make_recorder else None
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.as_tensor(xtr), torch.as_tensor(ytr).long()
    if folder is not None:
        torch.save(model.state_dict(), folder / "epoch_0.pt")
    for epoch in range(1, EPOCHS + 1):
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))  # memloc: seed 0 -> epoch
        for b in range(0, len(x), 64):
            idx = order[b:b + 64]
            logits = model(x[idx])
            if recorder is not None:
                recorder.batch(ids[idx], logits, y[idx])
            loss = F.cross_entropy(logits, y[idx], reduction="none").mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if folder is not None:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch},
                       folder / f"epoch_{epoch}.pt")
        if recorder is not None:
            recorder.epoch_end(model)
    return model


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    xtr, ytr, ytrue, xte, yte = _user_data()
    data = memloc.from_arrays(xtr, ytr, xte, yte, original_label=ytrue)
    folder = tmp_path_factory.mktemp("ckpts")
    model = _user_loop(xtr, ytr, folder)
    model.eval()
    with torch.no_grad():
        assert (model(torch.as_tensor(xtr)).argmax(1).numpy() == ytr).all()  # 100% clean and flipped fit
    run = memloc.Run.from_checkpoints(DigitNet, folder, data, tmp_path_factory.mktemp("runs") / "mine",
                                      config=RECIPE, progress=False)
    return run, data, folder


def test_data_carries_the_users_flip_record(user):
    run, data, _ = user
    assert (data.group == "noisy").sum() == 140 and data.meta["noise"]["count"] == 140
    ex = run.examples
    assert (ex[ex.group == "noisy"].label != ex[ex.group == "noisy"].original_label).all()
    s = run.summary
    assert s["train_acc_clean"] == 1.0 and s["train_acc_noisy"] == 1.0 and s["test_acc"] > 0.85
    assert run.epochs == list(range(EPOCHS + 1)) and run.model_name.endswith("DigitNet")
    assert memloc.layer_names(run.model()) == ["stem", "res", "down"]


def test_every_run_level_method_runs_on_the_users_model(user, tmp_path, monkeypatch):
    from memloc.models import MODELS

    run, data, _ = user
    for name in list(MODELS):  # any registry model built from here on is a failure
        monkeypatch.setitem(MODELS, name, lambda *a, name=name, **k: pytest.fail(f"memloc built its {name!r}"))
    built = DigitNet.instances

    def trains_digitnet(what):
        nonlocal built
        assert DigitNet.instances > built, f"{what} did not build the run's own model"
        built = DigitNet.instances

    dyn = scores.dynamics_scores(run)
    assert dyn.attrs["settings"]["source"] == "eval" and scores.auroc_table(dyn).auroc.iloc[0] > 0.9
    ck = scores.checkpoint_scores(run, epochs=[10, 30], n_directions=2, progress=False)
    assert scores.auroc_table(ck).set_index("score").auroc["curvature"] > 0.7
    ss = scores.second_split_forgetting(run, forget_epochs=4, fit_epochs=12, progress=False)
    trains_digitnet("second-split forgetting")
    assert ss[ss.group == "noisy"].ssft.median() <= ss[ss.group == "clean"].ssft.median()
    ho = scores.holdout_retraining(run, epochs=2)
    assert scores.auroc_table(ho).auroc.iloc[0] > 0.8
    rw = rewind_layers(run, epochs=[0, 20], progress=False)
    assert set(rw.layer) == {"none", "stem", "res", "down", "classifier"}
    rt = retrain_layers(run, layers=["res", "classifier"], max_epochs=2, progress=False)
    assert rt.attrs["settings"]["reset_to"].startswith("epoch 0")
    ab = ablate_examples(run, 15, progress=False)
    assert not any(u.startswith("classifier") for us in ab.units for u in us)  # no head-logit units by default
    s = summarize_flips(ab)
    assert s["noisy"]["median_units"] < s["clean"]["median_units"]
    cka = probes.compare_layers(run, method="cka", cross=False, max_examples=300, progress=False)
    assert np.allclose(cka.similarity, 1.0)
    dim = probes.layer_dimensions(run, max_examples=300)
    assert (dim.dimension > 0).all() and set(dim.layer) == {"stem", "res", "down", "classifier"}
    knn = probes.knn_probe(run, max_examples=500).set_index(["layer", "group", "target"])
    assert knn.loc[("classifier", "noisy", "flipped"), "accuracy"] > knn.loc[("stem", "noisy", "flipped"), "accuracy"]
    with pytest.warns(UserWarning, match="fit only"):  # 15 of the run's 40 epochs on 70% subsets: partly fit
        ens = train_ensemble(run, 6, 0.7, epochs=15, progress=False)
    trains_digitnet("the ensemble")
    assert ens.settings["model"].endswith("DigitNet") and ens.settings["optimizer"] == "sgd"
    fz = scores.feldman_zhang(ens, data)
    assert fz[fz.group == "noisy"].fz_memorization.mean() > fz[fz.group == "clean"].fz_memorization.mean() + 0.2
    mi = membership_inference(ens, data, n_targets=2).set_index(["attack", "group"])
    assert mi.loc[("loss", "noisy"), "auc"] > mi.loc[("loss", "clean"), "auc"]
    table = compare_unlearning(run, methods=["grad_diff", "zero_units"], out=tmp_path / "u",
                               params={"grad_diff": {"steps": 20}, "zero_units": {"n_locate": 10}},
                               progress=False).set_index("method")
    trains_digitnet("the unlearning oracle")
    assert table.loc["oracle", "forget_acc"] < 0.3 < table.loc["original", "forget_acc"]
    oracle = memloc.Run(tmp_path / "u" / "noisy" / "oracle")  # the oracle recorded the importable-or-not factory
    assert oracle.info["model_class"].endswith("DigitNet")


def test_results_agree_with_memlocs_own_run_path(user, tmp_path):
    """memloc.train on the same class, data and recipe gives the same checkpoints as the user's loop; adapting
    those checkpoints, recording the loop and training in memloc give the same analyses."""
    run, data, folder = user
    own = memloc.train({**RECIPE, "stop_at_train_acc": None}, tmp_path / "own", data=data, model=DigitNet,
                       progress=False)
    for e in (0, 7, EPOCHS):
        a, b = own.checkpoint(e), run.checkpoint(e)
        assert all(torch.equal(a[k], b[k]) for k in a), f"epoch {e} differs"
    ra = rewind_layers(own, epochs=[0, 10], progress=False)
    rb = rewind_layers(run, epochs=[0, 10], progress=False)
    assert ra.accuracy.tolist() == rb.accuracy.tolist()
    ca = scores.checkpoint_scores(own, epochs=[5, EPOCHS], n_directions=2, progress=False)
    cb = scores.checkpoint_scores(run, epochs=[5, EPOCHS], n_directions=2, progress=False)
    assert np.array_equal(ca.curvature.values, cb.curvature.values)
    da, db = scores.dynamics_scores(own, source="eval"), scores.dynamics_scores(run)
    assert np.array_equal(da.cumulative_loss.values, db.cumulative_loss.values)
    ids = data.example_id.numpy()[data.group == "noisy"][:5]
    ga = greedy_flip(own.model(), data, ids, progress=False, eval_size=100)
    gb = greedy_flip(run.model(), data, ids, progress=False, eval_size=100)
    assert list(ga.units) == list(gb.units)
    # the Recorder in the same loop: the same weights and the same per-example minibatch record
    xtr, ytr = data.train.x.numpy(), data.train.y.numpy()
    recs = []
    model = _user_loop(xtr, ytr, ids=data.train.example_id, make_recorder=lambda m: recs.append(
        memloc.Recorder(tmp_path / "rec", m, data, config=RECIPE)) or recs[0])
    rrun = recs[0].finish()
    assert all(torch.equal(v, own.checkpoint()[k]) for k, v in model.state_dict().items())
    mine, theirs = (r.dynamics.query("source == 'minibatch'").sort_values(["epoch", "example_id"])
                    for r in (rrun, own))
    assert np.array_equal(mine.correct.values, theirs.correct.values)
    assert np.allclose(mine.loss.values, theirs.loss.values, rtol=0, atol=1e-6)
    assert scores.dynamics_scores(rrun).attrs["settings"]["source"] == "minibatch"


def test_zero_units_and_ablate_on_a_residual_block(user):
    """zero_units (and greedy ablation) zero a unit's parameters: its channel at every parametrised submodule's
    output. On a residual block that is not ablate() on the block's output (the skip path carries the
    channel through); it is ablate() on each submodule."""
    from memloc.edit.unlearn import ClassifierTask, unlearn
    from memloc.hooks import ablate

    run, data, _ = user
    model = run.model()
    x = data.x[:64]
    task = ClassifierTask(data)
    for layer, subs in [("res", ["res.conv1", "res.bn1", "res.conv2", "res.bn2"]),
                        ("stem", ["stem.0", "stem.1"])]:
        new, rec = unlearn(model, task, [0], [1], "zero_units", units={layer: [2, 5]})
        with torch.no_grad():
            zeroed = new(x)
            with ablate(model, {s: [2, 5] for s in subs}):
                per_sub = model(x)
            with ablate(model, {layer: [2, 5]}):
                at_output = model(x)
        assert torch.allclose(zeroed, per_sub, atol=1e-5)
        if layer == "stem":  # a plain block: the same as ablating its output
            assert torch.allclose(zeroed, at_output, atol=1e-5)
        else:
            assert (zeroed - at_output).abs().max() > 1e-2


def test_bad_input_gets_clear_errors(user, tmp_path):
    run, data, folder = user
    with pytest.raises(ValueError, match=r"missing keys \['1.weight', '1.bias'\].*unexpected keys \['stem.0.weight'"):
        memloc.Run.from_checkpoints(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), folder, data,
                                    tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"shape mismatches stem.0.weight: model \[8, 1, 3, 3\] vs checkpoint \[16"):
        memloc.Run.from_checkpoints(lambda: DigitNet(width=8), {0: folder / "epoch_0.pt"}, data, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written on a bad input
    with pytest.raises(ValueError, match="saved epochs are"):
        rewind_layers(run, epochs=[0, 99], progress=False)
    with pytest.raises(ValueError, match="cannot be read as a weights-only torch file"):
        bad = tmp_path / "evil"
        bad.mkdir()
        torch.save(DigitNet(), bad / "epoch_1.pt")  # a whole pickled model, not a state dict
        memloc.Run.from_checkpoints(DigitNet, bad, data, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="does not fit DigitNet"):  # a factory that builds another architecture
        memloc.Run(run.path, model=lambda: DigitNet(width=4)).model()
    anonymous = memloc.Run.from_checkpoints(lambda: DigitNet(), {0: folder / "epoch_0.pt"}, data, tmp_path / "anon",
                                            progress=False)
    assert anonymous.model() is not None  # the Run object holds its factory ...
    with pytest.raises(ValueError, match=r"user model \(test_own_model.DigitNet\) that memloc cannot rebuild"):
        memloc.Run(anonymous.path).model()  # ... the folder cannot say how to build a lambda's model
    with pytest.raises(FileExistsError, match="refusing to write into it"):
        memloc.Run.from_checkpoints(DigitNet, folder, data, run.path, progress=False)
    with pytest.raises(ValueError, match="original_label has 3 entries"):
        memloc.from_arrays(np.zeros((4, 2)), [0, 1, 0, 1], original_label=[0, 1, 0])
    with pytest.raises(ValueError, match="test labels are never flipped"):
        memloc.from_arrays(np.zeros((4, 2)), [0, 1, 0, 1], split=["train", "train", "test", "test"],
                           original_label=[0, 1, 1, 1])
    rec = memloc.Recorder(tmp_path / "rec", DigitNet(), data)
    with pytest.raises(KeyError, match="not training examples"):
        rec.batch([data.test.example_id[0]], torch.zeros(1, 10))
    with pytest.raises(ValueError, match="differ from the data's training labels"):
        rec.batch(data.train.example_id[:4], torch.zeros(4, 10), (data.train.y[:4] + 1) % 10)
    # dynamics that do not cover the data: a recorded epoch that saw only part of the examples
    rec.batch(data.train.example_id[:10], torch.zeros(10, 10))
    rec.epoch_end(DigitNet())
    with pytest.raises(ValueError, match="covers 10 of the 1400 training examples"):
        scores.dynamics_scores(rec.finish())


def test_cli_on_a_users_run(user, tmp_path, capsys):
    """The command line reaches a user's run through --model-factory, and --device cuda fails in one line."""
    from memloc.cli import main

    run, data, folder = user
    anonymous = memloc.Run.from_checkpoints(lambda: DigitNet(), {0: folder / "epoch_0.pt", 5: folder / "epoch_5.pt"},
                                            data, tmp_path / "anon", progress=False)
    assert main(["locate", str(anonymous.path), "--method", "rewind", "--epochs", "0", "--quiet", "--out",
                 str(tmp_path / "l")]) == 2
    assert "--model-factory" in capsys.readouterr().err
    # a run whose factory was recorded as importable reopens by itself
    assert main(["locate", str(run.path), "--method", "rewind", "--epochs", "0", "--quiet", "--out",
                 str(tmp_path / "l0")]) == 0
    assert main(["locate", str(anonymous.path), "--method", "rewind", "--epochs", "0", "--quiet", "--out",
                 str(tmp_path / "l"), "--model-factory", f"{__name__}:DigitNet"]) == 0
    assert "stem" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["locate", str(run.path), "--method", "rewind", "--device", "cuda",
                     "--model-factory", f"{__name__}:DigitNet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no CUDA device" in err
