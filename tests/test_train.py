import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from memloc.train import Run, TrainConfig, evaluate, load_checkpoint, save_checkpoint, train


def _bits_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def run(small_run):
    return small_run


def test_fits_noisy_labels_and_writes_a_complete_run(run):
    s = run.summary
    assert s["train_acc_clean"] == 1.0 and s["train_acc_noisy"] == 1.0, "noisy labels must be memorized"
    assert s["test_acc"] > 0.7 and s["noisy_acc_original_label"] < 0.5
    assert s["epochs"] == s["fit_epoch"] < 100
    assert s["n"] == {"clean": 1293, "noisy": round(0.1 * 1437), "test": 360}
    assert run.epochs == list(range(s["epochs"] + 1))
    for f in ["config.json", "examples.parquet", "dynamics.parquet", "summary.json", "state.pt"]:
        assert (run.path / f).exists(), f
    assert not (run.path / "dynamics").exists()
    ex = run.examples
    assert (ex.group == "noisy").sum() == 144 and (ex.label != ex.original_label).sum() == 144
    assert run.examples.attrs["settings"]["fraction"] == 0.1


def test_dynamics_record(run):
    dyn = run.dynamics
    assert list(dyn.columns) == ["example_id", "epoch", "source", "loss", "correct", "margin", "confidence",
                                 "prediction"]
    E = run.summary["epochs"]
    mb, ev = dyn[dyn.source == "minibatch"], dyn[dyn.source == "eval"]
    assert len(mb) == 1437 * E and sorted(mb.epoch.unique()) == list(range(1, E + 1))
    assert len(ev) == 1797 * (E + 1)
    assert not mb.duplicated(["example_id", "epoch"]).any()
    # margin > 0 exactly when correct; confidence is a probability
    assert ((dyn.margin > 0) == dyn.correct).mean() > 0.999
    assert dyn.confidence.between(0, 1).all()
    # final eval rows agree with the summary
    last = ev[ev.epoch == E].merge(run.examples, on="example_id")
    assert last.loc[last.group == "noisy", "correct"].all()
    assert abs(last.loc[last.group == "test", "correct"].mean() - run.summary["test_acc"]) < 1e-12
    # noisy examples are learned later than clean ones (they are memorized, not generalized)
    first = mb[mb.correct].groupby("example_id").epoch.min().rename("first").reset_index().merge(run.examples)
    assert first.loc[first.group == "noisy", "first"].median() > first.loc[first.group == "clean", "first"].median()


def test_minibatch_rows_are_measured_before_the_step(run):
    # epoch 1's first minibatch is seen by the initial weights; an MLP has no dropout/BN, so train-mode losses
    # of those examples equal the eval-mode losses at epoch 0, and differ for later minibatches of epoch 1
    from memloc.train import _epoch_order

    cfg = run.config
    train_ids = run.examples.query("split == 'train'").example_id.to_numpy()
    order = _epoch_order(cfg.seed, 1, len(train_ids))
    first_ids = train_ids[order[:cfg.batch_size].numpy()]
    later_ids = train_ids[order[-cfg.batch_size:].numpy()]
    dyn = run.dynamics.set_index(["source", "epoch", "example_id"]).loss.sort_index()
    assert np.allclose(dyn.loc["minibatch", 1].loc[first_ids], dyn.loc["eval", 0].loc[first_ids], atol=1e-6)
    assert not np.allclose(dyn.loc["minibatch", 1].loc[later_ids], dyn.loc["eval", 0].loc[later_ids], atol=1e-4)


def test_checkpoint_round_trip_is_exact(run, tmp_path):
    model = run.model()
    assert not model.training
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(model, tmp_path / "c.safetensors")
    assert _bits_equal(load_checkpoint(tmp_path / "c.safetensors"), state)
    assert _bits_equal(run.model(0).state_dict(), run.checkpoint(0))
    data = run.data()
    df = evaluate(model, data)
    assert df.correct[data.split == "train"].all()
    with pytest.raises(ValueError, match="saved epochs are"):
        run.checkpoint(999)


def test_same_seed_same_run_and_resume_after_kill_is_identical(run, tmp_path, small_config):
    again = train(small_config, tmp_path / "again", progress=False)
    assert _bits_equal(again.checkpoint(), run.checkpoint())

    class Killed(Exception):
        pass

    def die(epoch, metrics):
        if epoch == 4:
            raise Killed

    with pytest.raises(Killed):
        train(small_config, tmp_path / "b", progress=False, on_epoch_end=die)
    partial = Run(tmp_path / "b")
    assert not partial.finished and partial.epochs == [0, 1, 2, 3, 4]
    # leftovers of an epoch that was being written when the process died are discarded on resume
    (tmp_path / "b/checkpoints/epoch_005.safetensors").write_bytes(b"garbage")
    resumed = train(small_config, tmp_path / "b", progress=False)
    assert _bits_equal(resumed.checkpoint(), run.checkpoint())
    pd.testing.assert_frame_equal(resumed.dynamics, run.dynamics)


def test_resume_after_sigkill(tmp_path, small_config):
    out = tmp_path / "k"
    cfg = dict(small_config, epochs=40, stop_at_train_acc=None)
    cmd = [sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); from memloc.train import train; "
           f"train({cfg!r}, {str(out)!r}, progress=False)"]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "epoch_003.safetensors").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    resumed = train(cfg, out, progress=False)
    reference = train(cfg, tmp_path / "ref", progress=False)
    assert resumed.summary["epochs"] == 40
    assert _bits_equal(resumed.checkpoint(), reference.checkpoint())
    assert resumed.dynamics.equals(reference.dynamics)


def test_a_different_config_is_not_mixed_into_an_existing_run(run, small_config):
    with pytest.raises(FileExistsError, match="different config.*'lr'"):
        train(dict(small_config, lr=0.1), run.path, progress=False)
    assert Run(run.path).finished  # untouched


@pytest.mark.parametrize("field,value,msg", [("dataset", "imagenet", "'dataset' parameter must be one of"),
                                             ("noise", 1.0, r"'noise' parameter must be a finite number in \[0, 1\)"),
                                             ("model", "gpt", "'model' parameter must be one of"),
                                             ("batch_size", 0, r"'batch_size' parameter must be an int in \[1, inf\)")])
def test_bad_config(tmp_path, field, value, msg):
    with pytest.raises(ValueError, match=msg):
        train({field: value}, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"CNN2d expects inputs \[B, C, H, W\]; got examples of shape \[64\]"):
        train({"dataset": "digits", "model": "cnn2d"}, tmp_path / "y", progress=False)
    assert not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match="Unknown TrainConfig field"):
        TrainConfig.from_dict({"nosie": 0.1})


def test_custom_data_is_saved_with_the_run(tmp_path):
    from memloc.data import from_arrays

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    data = from_arrays(x[:100], y[:100], x[100:], y[100:])
    r = train({"model": "mlp", "model_kwargs": {"hidden": [32]}, "noise": 0.1, "epochs": 3,
               "stop_at_train_acc": None}, tmp_path / "c", data=data, progress=False)
    back = r.data()
    assert torch.equal(back.x, data.x) and (back.group == "noisy").sum() == 10
    assert r.config.dataset == "custom"


def test_resnet9_runs_through_the_pipeline_with_batchnorm_buffers(tmp_path):
    from memloc.data import from_arrays

    rng = np.random.default_rng(1)
    x = rng.normal(size=(48, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 4, size=48)
    data = from_arrays(x[:40], y[:40], x[40:], y[40:], num_classes=4)
    cfg = {"model": "resnet9", "model_kwargs": {"width": 0.0625}, "optimizer": "sgd", "lr": 0.05,
           "schedule": "triangle", "noise": 0.2, "epochs": 3, "stop_at_train_acc": None, "batch_size": 16}
    full = train(cfg, tmp_path / "full", data=data, progress=False)

    def die(epoch, _):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", data=data, progress=False, on_epoch_end=die)
    resumed = train(cfg, tmp_path / "cut", data=data, progress=False)
    ck = resumed.checkpoint()
    assert "layers.0.bn.running_mean" in ck and int(ck["layers.0.bn.num_batches_tracked"]) == 3 * 3
    assert _bits_equal(ck, full.checkpoint())
    assert not torch.equal(ck["layers.0.bn.running_mean"], full.checkpoint(0)["layers.0.bn.running_mean"])


def _killed_at(point: str, cfg: dict, out) -> int:
    """Run ``train(cfg, out)`` in a subprocess that dies with ``os._exit(9)`` at ``point``: ``"finalize"`` (after 3
    per-epoch dynamics files were deleted by the clean-up, defect 2 of issue 16) or ``"first_state"`` (half-way
    through writing the first ``state.pt``, defect 4). Returns the exit status."""
    code = f"""
import os, torch
torch.set_num_threads(1)
from memloc.train import train
point = {point!r}
if point == "finalize":
    real, n = os.unlink, [0]
    def unlink(p, *a, **k):
        name = os.path.basename(str(p))
        if name.startswith("epoch_") and name.endswith(".parquet"):
            n[0] += 1
            if n[0] == 4:
                os._exit(9)
        return real(p, *a, **k)
    os.unlink = unlink
else:
    real_save = torch.save
    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and "optimizer" in obj:
            with open(f, "wb") as fh:
                fh.write(b"PK\\x03\\x04 half a file")
            os._exit(9)
        return real_save(obj, f, *a, **k)
    torch.save = save
train({cfg!r}, {str(out)!r}, progress=False)
"""
    return subprocess.run([sys.executable, "-c", code]).returncode


def test_a_kill_while_deleting_the_dynamics_parts_loses_no_row(run, tmp_path, small_config):
    out = tmp_path / "k"
    assert _killed_at("finalize", small_config, out) == 9
    assert (out / "dynamics.parquet").exists() and not (out / "summary.json").exists()
    left = sorted((out / "dynamics").glob("epoch_*.parquet"))
    assert 0 < len(left) < run.summary["epochs"] + 1 - 2  # killed part-way through the deletion
    resumed = train(small_config, out, progress=False)
    pd.testing.assert_frame_equal(resumed.dynamics, run.dynamics)
    assert not (out / "dynamics").exists()


def test_a_kill_during_the_first_state_write_leaves_a_run_that_resumes(run, tmp_path, small_config):
    import os

    out = tmp_path / "k"
    assert _killed_at("first_state", small_config, out) == 9
    assert not (out / "state.pt").exists() and list(out.glob(".state.pt.*.tmp"))  # the half file never took its name
    resumed = train(small_config, out, progress=False)
    assert _bits_equal(resumed.checkpoint(), run.checkpoint())
    pd.testing.assert_frame_equal(resumed.dynamics, run.dynamics)
    assert not list(out.rglob("*.tmp"))  # the killed writer's temp file is cleaned up
    umask = os.umask(0)
    os.umask(umask)
    for name in ("summary.json", "state.pt", "dynamics.parquet", "checkpoints/epoch_001.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # not mkstemp's 0600
