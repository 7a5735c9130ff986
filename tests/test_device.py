"""Devices: the plumbing is tested on the CPU everywhere; the CUDA tests run where a GPU is present."""
import numpy as np
import pytest
import torch

import memloc
from memloc.hooks import resolve_device

CUDA = torch.cuda.is_available()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(None)
    assert resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")
    with pytest.raises(ValueError, match="must be one of \\['auto', 'cpu', 'cuda'\\]"):
        resolve_device("gpu")
    if not CUDA:
        with pytest.raises(ValueError, match="has no CUDA device"):
            resolve_device("cuda")


def test_train_cli_device_flag(tmp_path, capsys):
    from memloc.cli import main

    args = ["train", "--dataset", "digits", "--model", "mlp", "--model-arg", "hidden=[16]", "--epochs", "1",
            "--quiet", "--threads", "1"]
    assert main(args + ["--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
    assert memloc.Run(tmp_path / "cpu").summary["device"] == "cpu"
    if not CUDA:
        assert main(args + ["--out", str(tmp_path / "cuda"), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "no CUDA device" in err
        assert not (tmp_path / "cuda").exists()


def test_bf16_autocast_trains_and_is_recorded(tmp_path):
    run = memloc.train({"dataset": "digits", "model": "mlp", "model_kwargs": {"hidden": [32]}, "epochs": 3,
                        "stop_at_train_acc": None, "precision": "bf16", "lr": 1e-2}, tmp_path / "bf", progress=False)
    plain = memloc.train({**run.config.to_dict(), "precision": "fp32", "dataset": "digits"}, tmp_path / "fp", progress=False)
    # bf16 steps learn as well as fp32 ones, but not bit for bit the same
    assert run.config.precision == "bf16" and abs(run.summary["train_acc"] - plain.summary["train_acc"]) < 0.05
    assert not torch.equal(run.checkpoint()["layers.0.linear.weight"], plain.checkpoint()["layers.0.linear.weight"])
    with pytest.raises(ValueError, match="'precision' parameter must be one of"):
        memloc.train({"precision": "fp8"}, tmp_path / "x", progress=False)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_everything_runs_on_cuda(tmp_path):
    from memloc.analyses import probes, scores
    from memloc.edit.unlearn import compare_unlearning
    from memloc.ensemble import train_ensemble
    from memloc.locate import ablate_examples, greedy_flip, retrain_layers, rewind_layers

    cfg = {"dataset": "digits", "dataset_kwargs": {"images": True}, "model": "cnn2d",
           "model_kwargs": {"channels": [8, 16]}, "epochs": 30, "lr": 1e-2, "seed": 0}
    gpu = memloc.train(cfg, tmp_path / "gpu", device="cuda", progress=False)
    assert next(gpu.model().parameters()).is_cuda and gpu.summary["device"].startswith("cuda")
    cpu = memloc.Run(gpu.path, device="cpu")
    a, b = rewind_layers(gpu, epochs=[0, 5], progress=False), rewind_layers(cpu, epochs=[0, 5], progress=False)
    assert np.allclose(a.accuracy, b.accuracy, atol=2e-3)
    ids = gpu.examples.query("group == 'noisy'").example_id[:4].tolist()
    assert len(greedy_flip(gpu.model(), gpu.data(), ids, progress=False)) == 4
    retrain_layers(gpu, max_epochs=1, progress=False)
    ablate_examples(gpu, 3, progress=False)
    scores.checkpoint_scores(gpu, epochs=[1], n_directions=2, progress=False)
    scores.second_split_forgetting(gpu, forget_epochs=2, fit_epochs=3, progress=False)
    scores.holdout_retraining(gpu, epochs=1)
    probes.knn_probe(gpu, max_examples=200)
    ens = train_ensemble(gpu, 4, epochs=2, progress=False)
    assert ens.settings["device"].startswith("cuda")
    compare_unlearning(gpu, methods=["grad_diff"], params={"grad_diff": {"steps": 5}}, out=tmp_path / "u",
                       progress=False)
