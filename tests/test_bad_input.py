"""Every bad input gets a clear error, and nothing is written (issue 16).

Each command-line case runs ``memloc.cli.main(argv)`` and asserts: exit status 2, a one-line ``memloc: error:``
(or argparse's ``error:``) message that names the parameter and says what is valid, no traceback, and no file
created, changed or removed anywhere under the test's folders (the shared run included). API cases assert the
documented exception (:class:`memloc.MemlocError` and its subclasses, all ``ValueError``) and its message.
"""
import math
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from memloc.cli import main
from memloc.validate import ConfigError, InputFileError, MemlocError, OutputExistsError

TINY_CFG = {"dataset": "digits", "model": "mlp", "model_kwargs": {"hidden": [32]}, "epochs": 3,
            "stop_at_train_acc": None, "seed": 1}
TINY = ["--dataset", "digits", "--model", "mlp", "--model-arg", "hidden=[32]", "--epochs", "3", "--stop-at", "0",
        "--seed", "1", "--quiet"]


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """One finished tiny run, damaged copies of it, a clean-label run, CIFAR folders good and bad, sweep specs."""
    from memloc.results import write_json
    from memloc.train import save_checkpoint, train

    root = tmp_path_factory.mktemp("bad_input")
    run = train(TINY_CFG, root / "run", progress=False).path
    train({**TINY_CFG, "noise": 0.0, "epochs": 1}, root / "clean", progress=False)

    def copy(name):
        shutil.copytree(run, root / name)
        return root / name

    (copy("badjson") / "config.json").write_text('{"train": {"lr": ')
    ck = copy("truncckpt") / "checkpoints" / "epoch_003.safetensors"
    ck.write_bytes(ck.read_bytes()[:100])
    save_checkpoint(torch.nn.Linear(3, 2), copy("shapeckpt") / "checkpoints" / "epoch_003.safetensors")
    (copy("unfinished") / "summary.json").unlink()
    for p in (copy("nockpt") / "checkpoints").iterdir():
        p.unlink()
    (copy("nodyn") / "dynamics.parquet").unlink()
    st = copy("truncstate")
    (st / "summary.json").unlink()
    (st / "state.pt").write_bytes((st / "state.pt").read_bytes()[:50])
    lm = root / "lmlike"
    lm.mkdir()
    write_json({"model": {"n_layers": 1}, "seed": 0}, lm / "config.json")
    write_json({"subjects": []}, lm / "world.json")
    user = root / "userfolder"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    (root / "afile").write_text("a file, not a folder")
    (root / "garbage.parquet").write_bytes(b"PAR1 not really")

    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo HACKED > " + str(root / "hacked"),))

    batches = {"garbage": b"\x00garbage\xff" * 10,
               "hostile": pickle.dumps({b"data": Hostile(), b"labels": [0]}, protocol=2),
               "truncated": pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 4}, protocol=2)[:60],
               "shape": pickle.dumps({b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]}, protocol=2),
               "notadict": pickle.dumps([1, 2, 3], protocol=2)}
    for kind, blob in batches.items():
        d = root / f"cifar_{kind}"
        d.mkdir()
        for n in names:
            (d / n).write_bytes(blob)

    def spec(name, text):
        (root / f"{name}.toml").write_text(text)

    g = '[grid]\ndataset = ["digits"]\nmodel = ["mlp"]\nseed = [0]\n'
    spec("ok", 'name = "ok"\n' + g + '[train]\nepochs = 2\n')
    spec("invalid", 'name = "x"\n[grid\nseed = [0]\n')
    spec("section", g + '[method.rewind]\nepochs = [0]\n')
    spec("gridkey", '[grid]\nseeds = [0]\n')
    spec("dataset", '[grid]\ndataset = ["imagenet"]\n')
    spec("model", '[grid]\nmodel = ["gpt"]\n')
    spec("method", '[grid]\nmethod = ["rewnid"]\n')
    spec("noise", '[grid]\nnoise = [1.5]\n')
    spec("seed", '[grid]\nseed = ["a"]\n')
    spec("notlist", '[grid]\nseed = 3\n')
    spec("emptygrid", 'name = "x"\n')
    spec("traversal", 'name = "../../x"\n' + g)
    spec("dotname", 'name = ".hidden"\n' + g)
    spec("trainkey", g + '[train]\nepoch = 2\n')
    spec("traingrid", g + '[train]\nnoise = 0.3\n')
    spec("trainlr", g + '[train]\nlr = -1\n')
    spec("trainmodel", g + '[train]\nmodel_kwargs = { hiden = [3] }\n')
    spec("methodarg", g + '[methods.rewind]\nepoch = [1]\n')
    spec("ablatearg", g + '[methods.ablate]\nn_per_grp = 3\n')
    spec("summaryarg", g + '[methods.summary]\nx = 1\n')
    spec("methodname", g + '[methods.rewnid]\nepochs = [1]\n')
    spec("methodtable", g + '[methods]\nrewind = 3\n')
    from memloc.sweep import load_spec
    stale = root / "stale_sweep"
    stale.mkdir()
    old = load_spec(root / "ok.toml")
    old["train"] = {"epochs": 5}
    write_json(old, stale / "spec.json")
    inv = root / "stale_investigation"
    inv.mkdir()
    write_json({"kind": "investigation", "settings": {"train": {"lr": 0.5}}}, inv / "memloc.json")
    return root


def _snapshot(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _cli(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


# ----------------------------------------------------------------------------------------------- command line

TRAIN = ["train", *TINY, "--out", "{root}/new"]
PLAIN = ["train", "--dataset", "digits", "--quiet", "--out", "{root}/new"]
SWEEP = ["sweep", "--out", "{root}/sweep_out", "--quiet"]

CLI_CASES = [
    # training values: every one refused before anything is written
    ("lr-inf", TRAIN + ["--lr", "inf"], ["'lr'", r"finite number in \(0, inf\)", "Got inf"]),
    ("lr-nan", TRAIN + ["--lr", "nan"], ["'lr'", "finite number", "Got nan"]),
    ("lr-negative", TRAIN + ["--lr", "-1"], ["'lr'", r"\(0, inf\)"]),
    ("lr-zero", TRAIN + ["--lr", "0"], ["'lr'", r"\(0, inf\)"]),
    ("lr-text", TRAIN + ["--lr", "fast"], ["--lr", "invalid float value"]),
    ("weight-decay-negative", TRAIN + ["--weight-decay", "-1"], ["'weight_decay'", r"\[0, inf\)"]),
    ("weight-decay-inf", TRAIN + ["--weight-decay", "inf"], ["'weight_decay'", "finite"]),
    ("noise-one", TRAIN + ["--noise", "1.0"], ["'noise'", r"\[0, 1\)"]),
    ("noise-negative", TRAIN + ["--noise", "-0.1"], ["'noise'", r"\[0, 1\)"]),
    ("noise-nan", TRAIN + ["--noise", "nan"], ["'noise'", "finite"]),
    ("batch-size-zero", TRAIN + ["--batch-size", "0"], ["'batch_size'", r"int in \[1, inf\)"]),
    ("batch-size-negative", TRAIN + ["--batch-size", "-5"], ["'batch_size'", r"\[1, inf\)"]),
    ("epochs-zero", TRAIN + ["--epochs", "0"], ["'epochs'", r"\[1, inf\)"]),
    ("epochs-negative", TRAIN + ["--epochs", "-3"], ["'epochs'", r"\[1, inf\)"]),
    ("epochs-text", TRAIN + ["--epochs", "a"], ["--epochs", "invalid int value: 'a'"]),
    ("seed-text", TRAIN + ["--seed", "x"], ["--seed", "invalid int value"]),
    ("stop-at-two", TRAIN + ["--stop-at", "2"], ["'stop_at_train_acc'", r"\(0, 1\]"]),
    ("stop-at-nan", TRAIN + ["--stop-at", "nan"], ["'stop_at_train_acc'", "finite"]),
    ("stop-at-negative", TRAIN + ["--stop-at", "-0.5"], ["'stop_at_train_acc'", r"\(0, 1\]"]),
    ("dataset-unknown", TRAIN + ["--dataset", "imagenet"], ["'dataset'", "one of", "digits"]),
    ("model-unknown", TRAIN + ["--model", "gpt"], ["'model'", "one of", "mlp"]),
    ("optimizer-unknown", TRAIN + ["--optimizer", "rmsprop"], ["'optimizer'", "one of", "adam"]),
    ("schedule-unknown", TRAIN + ["--schedule", "linear"], ["'schedule'", "one of", "cosine"]),
    ("precision-unknown", TRAIN + ["--precision", "fp16"], ["--precision", "invalid choice", "bf16"]),
    ("device-unknown", TRAIN + ["--device", "tpu"], ["'device'", "one of", "cuda"]),
    ("threads-negative", TRAIN + ["--threads", "-1"], ["'--threads'", r"int in \[1, inf\)"]),
    ("threads-zero", TRAIN + ["--threads", "0"], ["'--threads'", r"\[1, inf\)"]),
    ("data-arg-typo", TRAIN + ["--data-arg", "num_sample=3"], ["num_sample", "'dataset_kwargs'", "valid keys",
                                                               "test_fraction"]),
    ("data-arg-range", TRAIN + ["--data-arg", "test_fraction=2"], ["'test_fraction'", r"\(0, 1\)"]),
    ("data-arg-text", TRAIN + ["--data-arg", "test_fraction=abc"], ["'test_fraction'", "finite number"]),
    ("data-arg-bool", TRAIN + ["--data-arg", "images=maybe"], ["'images'", "true or false"]),
    ("data-arg-seed", TRAIN + ["--data-arg", "seed=1.5"], ["'seed'", "an int"]),
    ("data-arg-no-equals", TRAIN + ["--data-arg", "noequals"], ["'--data-arg'", "KEY=VALUE"]),
    ("data-arg-no-key", TRAIN + ["--data-arg", "=3"], ["'--data-arg'", "KEY=VALUE"]),
    ("mnist1d-arg-unknown", TRAIN + ["--dataset", "mnist1d", "--data-arg", "bogus=1"], ["bogus", "valid ones"]),
    ("mnist1d-few", TRAIN + ["--dataset", "mnist1d", "--data-arg", "num_samples=5"], ["'num_samples'", r"\[20, inf\)"]),
    ("mnist1d-split", TRAIN + ["--dataset", "mnist1d", "--data-arg", "train_split=1.5"], ["'train_split'", r"\(0, 1\)"]),
    ("model-arg-typo", TRAIN + ["--model-arg", "hiden=[3]"], ["hiden", "'model_kwargs'", "valid keys", "hidden"]),
    ("model-arg-zero-width", TRAIN + ["--model-arg", "hidden=[0]"], ["'model_kwargs.hidden'", r"ints in \[1, inf\)"]),
    ("model-arg-text", TRAIN + ["--model-arg", "hidden=abc"], ["'model_kwargs.hidden'", "list of ints", "'abc'"]),
    ("model-arg-negative", TRAIN + ["--model-arg", "hidden=[-4]"], ["'model_kwargs.hidden'", r"\[1, inf\)"]),
    ("model-arg-float", TRAIN + ["--model-arg", "hidden=[1.5]"], ["'model_kwargs.hidden'", "list of ints"]),
    ("model-arg-scalar", TRAIN + ["--model-arg", "hidden=64"], ["'model_kwargs.hidden'", "list of ints"]),
    ("model-arg-other-model", TRAIN + ["--model-arg", "width=2"], ["width", "valid keys", "hidden"]),
    ("model-arg-channels", PLAIN + ["--model", "cnn1d", "--model-arg", "channels=[0]"],
     ["'model_kwargs.channels'", r"\[1, inf\)"]),
    ("model-arg-width-zero", PLAIN + ["--model", "resnet9", "--model-arg", "width=0"],
     ["'model_kwargs.width'", r"\(0, inf\)"]),
    ("model-arg-width-text", PLAIN + ["--model", "resnet9", "--model-arg", "width=nan"],
     ["'model_kwargs.width'", "finite number"]),
    ("model-arg-batch-norm", PLAIN + ["--model", "cnn2d", "--model-arg", "batch_norm=3"],
     ["'model_kwargs.batch_norm'", "true or false"]),
    ("model-arg-no-equals", TRAIN + ["--model-arg", "hidden"], ["'--model-arg'", "KEY=VALUE"]),
    ("etd-p-mem", TRAIN + ["--example-tied-dropout", "--p-mem", "2"], ["'p_mem'", r"\(0, 1\]"]),
    ("etd-p-mem-zero", TRAIN + ["--example-tied-dropout", "--p-mem", "0"], ["'p_mem'", r"\(0, 1\]"]),
    ("etd-p-fixed", TRAIN + ["--example-tied-dropout", "--p-fixed", "1"], ["'p_fixed'", r"\[0, 1\)"]),
    ("etd-site", TRAIN + ["--example-tied-dropout", "--etd-sites", "nope"], ["'nope'", "Valid sites", "layers.0"]),
    ("out-is-a-file", ["train", *TINY, "--out", "{root}/afile"], ["'--out'", "must be a folder", "is a file"]),
    ("out-user-folder", ["train", *TINY, "--out", "{root}/userfolder"], ["userfolder", "not empty", "refusing"]),
    ("out-other-config", ["train", *TINY, "--lr", "0.5", "--out", "{root}/run"], ["different config", "'lr'"]),
    ("resume-truncated-state", ["train", *TINY, "--out", "{root}/truncstate"],
     ["state.pt", "corrupt or truncated", "--overwrite"]),
    ("cifar-missing", TRAIN + ["--dataset", "cifar10", "--data-arg", "root={root}/nowhere"],
     ["No CIFAR-10 batches found", "cifar-10-batches-py"]),
    ("cifar-garbage", TRAIN + ["--dataset", "cifar10", "--data-arg", "root={root}/cifar_garbage"],
     ["data_batch_1 is not a CIFAR-10 python batch", "cifar-10-batches-py"]),
    ("cifar-hostile", TRAIN + ["--dataset", "cifar10", "--data-arg", "root={root}/cifar_hostile"],
     ["not a CIFAR-10 python batch", "Refusing to load", "system"]),
    ("cifar-truncated", TRAIN + ["--dataset", "cifar10", "--data-arg", "root={root}/cifar_truncated"],
     ["not a CIFAR-10 python batch", "cifar-10-batches-py"]),
    ("cifar-shape", TRAIN + ["--dataset", "cifar10", "--data-arg", "root={root}/cifar_shape"],
     ["not a CIFAR-10 batch", r"\[2, 5\]", r"\[n, 3072\]"]),
    ("cifar-not-a-dict", TRAIN + ["--dataset", "cifar10", "--data-arg", "root={root}/cifar_notadict"],
     ["not a CIFAR-10 python batch"]),
    ("cifar-n-train", TRAIN + ["--dataset", "cifar10", "--data-arg", "n_train=0"], ["'n_train'", r"\[1, inf\)"]),
    ("cifar-arg-typo", TRAIN + ["--dataset", "cifar10", "--data-arg", "ntrain=5"], ["ntrain", "valid keys", "n_train"]),
    # locate
    ("ablate-keep-weight-nan", ["locate", "{root}/run", "--method", "ablate", "--keep-weight", "nan"],
     ["'keep_weight'", r"finite number in \[0, inf\)", "nan"]),
    ("ablate-keep-weight-inf", ["locate", "{root}/run", "--method", "ablate", "--keep-weight", "inf"],
     ["'keep_weight'", "finite"]),
    ("ablate-keep-weight-negative", ["locate", "{root}/run", "--method", "ablate", "--keep-weight", "-1"],
     ["'keep_weight'", r"\[0, inf\)"]),
    ("ablate-n-per-group-negative", ["locate", "{root}/run", "--method", "ablate", "--n-per-group", "-1"],
     ["'n_per_group'", r"int in \[1, inf\)"]),
    ("ablate-n-per-group-zero", ["locate", "{root}/run", "--method", "ablate", "--n-per-group", "0"],
     ["'n_per_group'", r"\[1, inf\)"]),
    ("ablate-batch-size", ["locate", "{root}/run", "--method", "ablate", "--batch-size", "0"],
     ["'batch_size'", r"\[1, inf\)"]),
    ("ablate-max-units", ["locate", "{root}/run", "--method", "ablate", "--max-units", "0"],
     ["'max_units'", r"\[1, inf\)"]),
    ("ablate-noise-samples", ["locate", "{root}/run", "--method", "ablate", "--noise-samples", "-1"],
     ["'noise_samples'", r"\[0, inf\)"]),
    ("rewind-epochs-text", ["locate", "{root}/run", "--method", "rewind", "--epochs", "a"],
     ["'--epochs'", "comma-separated list of ints", "'a'"]),
    ("rewind-epochs-mixed", ["locate", "{root}/run", "--method", "rewind", "--epochs", "1,x"],
     ["'--epochs'", "list of ints"]),
    ("rewind-epochs-negative", ["locate", "{root}/run", "--method", "rewind", "--epochs", "-1"],
     ["'--epochs'", ">= 0"]),
    ("rewind-epochs-missing", ["locate", "{root}/run", "--method", "rewind", "--epochs", "999"],
     ["999", r"saved epochs are \[0, 1, 2, 3\]"]),
    ("locate-layer-typo", ["locate", "{root}/run", "--method", "rewind", "--layers", "nope"],
     ["'nope'", "its layers are", "layers.0"]),
    ("retrain-max-epochs", ["locate", "{root}/run", "--method", "retrain", "--max-epochs", "0"],
     ["'max_epochs'", r"\[1, inf\)"]),
    ("locate-method-unknown", ["locate", "{root}/run", "--method", "bogus"], ["--method", "invalid choice", "rewind"]),
    ("locate-no-run", ["locate", "{root}/nowhere", "--method", "rewind"], ["nowhere is not a memloc run",
                                                                             "config.json"]),
    ("locate-run-is-a-file", ["locate", "{root}/afile", "--method", "rewind"], ["afile is not a memloc run"]),
    ("locate-out-is-a-file", ["locate", "{root}/run", "--method", "rewind", "--out", "{root}/afile"],
     ["'--out'", "must be a folder"]),
    ("locate-threads", ["locate", "{root}/run", "--method", "rewind", "--threads", "-2"], ["'--threads'", r"\[1, inf\)"]),
    ("locate-device", ["locate", "{root}/run", "--method", "rewind", "--device", "tpu"], ["'device'", "one of"]),
    ("locate-lm-run", ["locate", "{root}/lmlike", "--method", "rewind"], ["language-model run", "memloc lm"]),
    ("locate-corrupt-config", ["locate", "{root}/badjson", "--method", "rewind"],
     [r"badjson/config.json is not valid JSON", "corrupt or truncated"]),
    ("locate-truncated-checkpoint", ["locate", "{root}/truncckpt", "--method", "rewind"],
     ["epoch_003.safetensors is corrupt or truncated"]),
    ("locate-wrong-shape-checkpoint", ["locate", "{root}/shapeckpt", "--method", "rewind"],
     ["does not fit MLP", "missing keys", "unexpected keys"]),
    ("locate-unfinished", ["locate", "{root}/unfinished", "--method", "rewind"], ["is not finished", "rerun"]),
    ("locate-no-checkpoints", ["locate", "{root}/nockpt", "--method", "rewind"], ["has no checkpoints"]),
    ("locate-model-factory", ["locate", "{root}/run", "--method", "rewind", "--model-factory", "nonsense"],
     ["'package.module:name'", "nonsense"]),
    ("locate-model-factory-import", ["locate", "{root}/run", "--method", "rewind", "--model-factory",
                                     "no_such_module_x:Net"], ["Cannot import the model factory", "no_such_module_x"]),
    # probe
    ("probe-max-examples-two", ["probe", "{root}/run", "--max-examples", "2"], ["'--max-examples'", r"\[20, inf\)"]),
    ("probe-max-examples-zero", ["probe", "{root}/run", "--max-examples", "0"], ["'--max-examples'", r"\[20, inf\)"]),
    ("probe-max-examples-negative", ["probe", "{root}/run", "--max-examples", "-5"], ["'--max-examples'"]),
    ("probe-method", ["probe", "{root}/run", "--method", "foo"], ["--method", "invalid choice", "cka"]),
    ("probe-estimator", ["probe", "{root}/run", "--estimator", "foo"], ["--estimator", "invalid choice", "twonn"]),
    ("probe-against-missing", ["probe", "{root}/run", "--against", "{root}/nowhere"], ["nowhere is not a memloc run"]),
    ("probe-truncated-checkpoint", ["probe", "{root}/truncckpt", "--max-examples", "50"],
     ["epoch_003.safetensors is corrupt or truncated"]),
    ("probe-out-is-a-file", ["probe", "{root}/run", "--out", "{root}/afile"], ["'--out'", "must be a folder"]),
    # scores
    ("scores-clean-label-run", ["scores", "{root}/clean"], ["no flipped labels", "noise 0.0", "--noise > 0"]),
    ("scores-no-dynamics", ["scores", "{root}/nodyn"], ["has no dynamics.parquet"]),
    ("scores-ensemble-epochs-zero", ["scores", "{root}/run", "--ensemble-epochs", "0"],
     ["'--ensemble-epochs'", r"\[1, inf\)"]),
    ("scores-ensemble-epochs-negative", ["scores", "{root}/run", "--ensemble-epochs", "-1"], ["'--ensemble-epochs'"]),
    ("scores-ensemble-lr-nan", ["scores", "{root}/run", "--ensemble-lr", "nan"], ["'--ensemble-lr'", "finite"]),
    ("scores-ensemble-lr-zero", ["scores", "{root}/run", "--ensemble-lr", "0"], ["'--ensemble-lr'", r"\(0, inf\)"]),
    ("scores-ensemble-batch-size", ["scores", "{root}/run", "--ensemble-batch-size", "0"],
     ["'--ensemble-batch-size'", r"\[1, inf\)"]),
    ("scores-models-one", ["scores", "{root}/run", "--models", "1"], ["'--models'", r"\[2, inf\)"]),
    ("scores-ratio-high", ["scores", "{root}/run", "--ratio", "1.5"], ["'--ratio'", r"\(0, 1\)"]),
    ("scores-ratio-zero", ["scores", "{root}/run", "--ratio", "0"], ["'--ratio'", r"\(0, 1\)"]),
    ("scores-cscore-models", ["scores", "{root}/run", "--cscore-models", "0"], ["'--cscore-models'", r"\[1, inf\)"]),
    ("scores-n-directions", ["scores", "{root}/run", "--n-directions", "0"], ["'--n-directions'", r"\[1, inf\)"]),
    ("scores-h-zero", ["scores", "{root}/run", "--h", "0"], ["'--h'", r"\(0, inf\)"]),
    ("scores-h-nan", ["scores", "{root}/run", "--h", "nan"], ["'--h'", "finite"]),
    ("scores-epochs-text", ["scores", "{root}/run", "--epochs", "a"], ["'--epochs'", "list of ints"]),
    ("scores-ensemble-arg-typo", ["scores", "{root}/run", "--ensemble-model", "mlp", "--ensemble-model-arg",
                                  "hiden=[3]"], ["hiden", "'--ensemble-model-arg'", "valid keys", "hidden"]),
    ("scores-ensemble-arg-zero", ["scores", "{root}/run", "--ensemble-model", "mlp", "--ensemble-model-arg",
                                  "hidden=[0]"], ["'--ensemble-model-arg.hidden'", r"\[1, inf\)"]),
    ("scores-ensemble-arg-alone", ["scores", "{root}/run", "--ensemble-model-arg", "hidden=[3]"],
     ["--ensemble-model-arg goes with --ensemble-model"]),
    ("scores-ensemble-model-unknown", ["scores", "{root}/run", "--ensemble-model", "gpt"],
     ["'--ensemble-model'", "one of", "mlp"]),
    ("scores-family", ["scores", "{root}/run", "--score", "foo"], ["--score", "invalid choice", "dynamics"]),
    ("scores-form", ["scores", "{root}/run", "--form", "foo"], ["--form", "invalid choice", "squared"]),
    ("scores-out-is-a-file", ["scores", "{root}/run", "--out", "{root}/afile"], ["'--out'", "must be a folder"]),
    # unlearn
    ("unlearn-forget-text", ["unlearn", "{root}/run", "--forget", "abc"], ["'--forget'", "'noisy' or comma-separated"]),
    ("unlearn-forget-mixed", ["unlearn", "{root}/run", "--forget", "1,b"], ["'--forget'", "example ids"]),
    ("unlearn-method", ["unlearn", "{root}/run", "--method", "nope"], ["nope", "valid methods are", "npo"]),
    ("unlearn-param-typo", ["unlearn", "{root}/run", "--method", "npo", "--param", "npo.stepz=3"],
     ["stepz", "'npo'", "steps"]),
    ("unlearn-param-no-dot", ["unlearn", "{root}/run", "--param", "steps=3"], ["METHOD.KEY=VALUE"]),
    ("unlearn-param-other-method", ["unlearn", "{root}/run", "--method", "grad_ascent", "--param", "npo.steps=3"],
     ["'npo'", "not among the methods"]),
    ("unlearn-param-no-equals", ["unlearn", "{root}/run", "--param", "npo.steps"], ["'--param'", "KEY=VALUE"]),
    ("unlearn-out-is-a-file", ["unlearn", "{root}/run", "--out", "{root}/afile"], ["'--out'", "must be a folder"]),
    ("unlearn-no-run", ["unlearn", "{root}/nowhere"], ["nowhere is not a memloc run"]),
    # edit (checked before any model is loaded)
    ("edit-sequential-zero", ["edit", "{root}/nowhere", "--sequential", "0"], ["'--sequential'", r"\[1, inf\)"]),
    ("edit-batch-without-sequential", ["edit", "{root}/nowhere", "--batch", "10"], ["--batch and --every go with"]),
    ("edit-rome-batch", ["edit", "{root}/nowhere", "--sequential", "10", "--batch", "5"],
     ["one fact at a time", "memit or alphaedit"]),
    ("edit-threshold-negative", ["edit", "{root}/nowhere", "--sequential", "10", "--method", "alphaedit",
                                 "--threshold", "-1"], ["'--threshold'", r"\[0, inf\)"]),
    ("edit-method-unknown", ["edit", "{root}/nowhere", "--method", "emmet"], ["--method", "invalid choice", "alphaedit"]),
    ("edit-v-steps-negative", ["edit", "{root}/nowhere", "--v-steps", "-3"], ["'--v-steps'", r"int in \[1, inf\)"]),
    ("edit-v-steps-zero", ["edit", "{root}/nowhere", "--v-steps", "0"], ["'--v-steps'", r"\[1, inf\)"]),
    ("edit-clamp-nan", ["edit", "{root}/nowhere", "--clamp", "nan"], ["'--clamp'", "finite number"]),
    ("edit-clamp-negative", ["edit", "{root}/nowhere", "--clamp", "-1"], ["'--clamp'", r"\(0, inf\)"]),
    ("edit-clamp-zero", ["edit", "{root}/nowhere", "--clamp", "0"], ["'--clamp'", r"\(0, inf\)"]),
    ("edit-n-zero", ["edit", "{root}/nowhere", "--n", "0"], ["'--n'", r"\[1, inf\)"]),
    ("edit-n-negative", ["edit", "{root}/nowhere", "--n", "-2"], ["'--n'", r"\[1, inf\)"]),
    ("edit-layer-negative", ["edit", "{root}/nowhere", "--layer", "-1"], ["'--layer'", r"\[0, inf\)"]),
    ("edit-limit-zero", ["edit", "{root}/nowhere", "--limit", "0"], ["'--limit'", r"\[1, inf\)"]),
    ("edit-memit-layers-text", ["edit", "{root}/nowhere", "--memit-layers", "a"], ["'--memit-layers'", "list of ints"]),
    ("edit-memit-layers-negative", ["edit", "{root}/nowhere", "--memit-layers", "0,-1"],
     ["'--memit-layers'", ">= 0"]),
    ("edit-nothing", ["edit"], ["needs a language-model run", "--requests"]),
    ("edit-save-is-a-file", ["edit", "{root}/nowhere", "--save", "{root}/afile"], ["'--save'", "must be a folder"]),
    ("edit-requests-without-model", ["edit", "--requests", "{root}/nowhere.json"], ["--model DIR", "--requests FILE"]),
    # sweep
    ("sweep-spec-folder", ["sweep", "{root}", *SWEEP[1:]], ["No sweep spec", "it is a folder"]),
    ("sweep-spec-missing", ["sweep", "{root}/nowhere.toml", *SWEEP[1:]], ["No sweep spec at", "nowhere.toml"]),
    ("sweep-spec-invalid", ["sweep", "{root}/invalid.toml", *SWEEP[1:]], ["invalid.toml is not valid TOML"]),
    ("sweep-section-typo", ["sweep", "{root}/section.toml", *SWEEP[1:]], ["'method'", "valid keys", "methods"]),
    ("sweep-grid-key", ["sweep", "{root}/gridkey.toml", *SWEEP[1:]], ["Unknown grid key", "seeds", "valid keys"]),
    ("sweep-grid-dataset", ["sweep", "{root}/dataset.toml", *SWEEP[1:]], ["imagenet", "'grid.dataset'", "digits"]),
    ("sweep-grid-model", ["sweep", "{root}/model.toml", *SWEEP[1:]], ["gpt", "'grid.model'", "mlp"]),
    ("sweep-grid-method", ["sweep", "{root}/method.toml", *SWEEP[1:]], ["rewnid", "'grid.method'", "rewind"]),
    ("sweep-grid-noise", ["sweep", "{root}/noise.toml", *SWEEP[1:]], ["'grid.noise'", r"\[0, 1\)"]),
    ("sweep-grid-seed", ["sweep", "{root}/seed.toml", *SWEEP[1:]], ["'grid.seed'", "an int"]),
    ("sweep-grid-not-a-list", ["sweep", "{root}/notlist.toml", *SWEEP[1:]], ["'grid.seed'", "non-empty list"]),
    ("sweep-no-grid", ["sweep", "{root}/emptygrid.toml", *SWEEP[1:]], ["needs a \\[grid\\] table"]),
    ("sweep-name-traversal", ["sweep", "{root}/traversal.toml"], ["'name'", "plain file name", r"\.\./\.\./x"]),
    ("sweep-name-hidden", ["sweep", "{root}/dotname.toml", *SWEEP[1:]], ["'name'", "plain file name"]),
    ("sweep-train-typo", ["sweep", "{root}/trainkey.toml", *SWEEP[1:]], ["'epoch'", "'train'", "epochs"]),
    ("sweep-train-grid-key", ["sweep", "{root}/traingrid.toml", *SWEEP[1:]], ["'noise'", "go in \\[grid\\]"]),
    ("sweep-train-lr", ["sweep", "{root}/trainlr.toml", *SWEEP[1:]], ["'lr'", r"\(0, inf\)"]),
    ("sweep-train-model-arg", ["sweep", "{root}/trainmodel.toml", *SWEEP[1:]], ["hiden", "'model_kwargs'", "hidden"]),
    ("sweep-method-arg", ["sweep", "{root}/methodarg.toml", *SWEEP[1:]], ["'epoch'", "'methods.rewind'", "epochs"]),
    ("sweep-ablate-arg", ["sweep", "{root}/ablatearg.toml", *SWEEP[1:]], ["n_per_grp", "'methods.ablate'",
                                                                           "n_per_group"]),
    ("sweep-summary-arg", ["sweep", "{root}/summaryarg.toml", *SWEEP[1:]], ["'x'", "'methods.summary'"]),
    ("sweep-method-name", ["sweep", "{root}/methodname.toml", *SWEEP[1:]], ["rewnid", "'methods'", "rewind"]),
    ("sweep-method-table", ["sweep", "{root}/methodtable.toml", *SWEEP[1:]], ["methods.rewind", "table"]),
    ("sweep-workers", ["sweep", "{root}/ok.toml", *SWEEP[1:], "--workers", "0"], ["'--workers'", r"\[1, inf\)"]),
    ("sweep-executor", ["sweep", "{root}/ok.toml", *SWEEP[1:], "--executor", "dask"], ["--executor", "invalid choice"]),
    ("sweep-out-is-a-file", ["sweep", "{root}/ok.toml", "--out", "{root}/afile"], ["'--out'", "must be a folder"]),
    ("sweep-out-user-folder", ["sweep", "{root}/ok.toml", "--out", "{root}/userfolder"], ["holds no sweep",
                                                                                         "--overwrite"]),
    ("sweep-changed-train", ["sweep", "{root}/ok.toml", "--out", "{root}/stale_sweep"],
     ["other settings", "train.epochs: 5 -> 2", "--overwrite"]),
    # investigate
    ("investigate-ablate-zero", ["investigate", *TINY, "--ablate-per-group", "0", "--out", "{root}/inv"],
     ["'ablate_per_group'", r"\[1, inf\)"]),
    ("investigate-ablate-negative", ["investigate", *TINY, "--ablate-per-group", "-3", "--out", "{root}/inv"],
     ["'ablate_per_group'"]),
    ("investigate-lr", ["investigate", *TINY, "--lr", "inf", "--out", "{root}/inv"], ["'lr'", "finite"]),
    ("investigate-model-arg", ["investigate", *TINY, "--model-arg", "hiden=1", "--out", "{root}/inv"],
     ["hiden", "valid keys"]),
    ("investigate-user-folder", ["investigate", *TINY, "--out", "{root}/userfolder"],
     ["was not written by memloc's investigation", "--overwrite"]),
    ("investigate-other-settings", ["investigate", *TINY, "--out", "{root}/stale_investigation"],
     ["other settings", "train.lr: 0.5 -> 0.003", "--overwrite"]),
    ("investigate-out-is-a-file", ["investigate", *TINY, "--out", "{root}/afile"], ["'--out'", "must be a folder"]),
    # summary and the parser
    ("summary-file", ["summary", "{root}/afile"], ["afile is not a memloc run"]),
    ("summary-missing", ["summary", "{root}/nowhere"], ["nowhere is not a memloc run"]),
    ("summary-corrupt-config", ["summary", "{root}/badjson"], ["badjson/config.json is not valid JSON"]),
    ("summary-lm-run", ["summary", "{root}/lmlike"], ["language-model run"]),
    # analysis commands never write into a folder memloc did not create
    ("locate-out-user-folder", ["locate", "{root}/run", "--method", "rewind", "--out", "{root}/userfolder"],
     ["userfolder", "was not written by memloc"]),
    ("probe-out-user-folder", ["probe", "{root}/run", "--out", "{root}/userfolder"], ["was not written by memloc"]),
    ("scores-out-user-folder", ["scores", "{root}/run", "--score", "dynamics", "--out", "{root}/userfolder"],
     ["was not written by memloc"]),
    ("unlearn-out-user-folder", ["unlearn", "{root}/run", "--method", "grad_ascent", "--out", "{root}/userfolder"],
     ["was not written by memloc"]),
    ("localize-bench-out-user-folder", ["localize-bench", "{root}/run", "--kind", "del", "--out", "{root}/userfolder"],
     ["was not written by memloc"]),
    ("localize-bench-method", ["localize-bench", "{root}/run", "--kind", "inj", "--methods", "hc"],
     ["--methods", "hardconcrete"]),
    ("localize-bench-fractions", ["localize-bench", "{root}/run", "--kind", "del", "--fractions", "0.1,x"],
     ["--fractions"]),
    ("localize-bench-fraction-range", ["localize-bench", "{root}/run", "--kind", "del", "--fractions", "1.5"],
     ["--fractions"]),
    ("localize-bench-ratio", ["localize-bench", "{root}/run", "--kind", "inj", "--ratio", "1"], ["--ratio"]),
    ("localize-bench-not-a-run", ["localize-bench", "{root}/nowhere", "--kind", "inj"], ["not a run folder"]),
    ("unlearn-relearn-lr-alone", ["unlearn", "{root}/run", "--relearn-lr", "0.1"], ["--relearn-steps"]),
    ("unlearn-relearn-steps", ["unlearn", "{root}/run", "--relearn-steps", "0"], ["--relearn-steps"]),
    ("unlearn-relearn-fraction", ["unlearn", "{root}/run", "--relearn-steps", "5", "--relearn-fraction", "1"],
     ["--relearn-fraction"]),
    ("locate-out-file", ["locate", "{root}/run", "--method", "rewind", "--out", "{root}/afile"], ["is a file"]),
    ("lm-train-user-folder", ["lm", "train", "--out", "{root}/userfolder", "--people", "10"],
     ["not a memloc GPT-2 testbed"]),
    ("lm-train-word-user-folder", ["lm", "train", "--kind", "word", "--out", "{root}/userfolder"],
     ["not a memloc word-testbed run"]),
    ("lm-train-d-model", ["lm", "train", "--out", "{root}/new_lm", "--d-model", "3"], ["d_model"]),
    ("lm-train-layers", ["lm", "train", "--out", "{root}/new_lm", "--layers", "0"], ["--layers"]),
    ("lm-train-people", ["lm", "train", "--out", "{root}/new_lm", "--people", "1"], ["--people"]),
    ("no-command", [], ["required", "command"]),
    ("unknown-command", ["fly"], ["invalid choice", "train"]),
]


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_command_line(world, capsys, argv, expected):
    before = _snapshot(world)
    rc = _cli([a.format(root=world) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert re.match(r"memloc( \w+)?: error: ", last), last
    for pattern in expected:
        assert re.search(pattern, last), (pattern, last)
    assert _snapshot(world) == before, "a failed command changed files"
    assert not (world / "hacked").exists()


def test_debug_shows_the_traceback_and_bugs_keep_theirs(world, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="'lr'"):
        main(["train", *TINY, "--lr", "inf", "--out", str(world / "new"), "--debug"])
    import memloc.cli as cli

    def bug(a):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "_summary", bug)
    with pytest.raises(TypeError, match="a bug"):  # not a user error: never swallowed into one line
        main(["summary", str(world / "run")])


def test_a_full_disk_is_one_clear_line(world, capsys, monkeypatch):
    import errno

    import memloc.cli as cli

    def full(a):
        raise OSError(errno.ENOSPC, "No space left on device", str(world / "x.parquet"))

    monkeypatch.setattr(cli, "_summary", full)
    assert main(["summary", str(world / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memloc: error: disk full while writing") and "x.parquet" in err and "rerun" in err


def test_a_rejected_value_leaves_no_stub_so_a_valid_rerun_works(world, tmp_path, capsys):
    out = tmp_path / "r"
    assert _cli(["train", *TINY, "--weight-decay", "-1", "--out", str(out)]) == 2
    assert not out.exists()
    assert _cli(["train", *TINY, "--out", str(out)]) == 0
    assert (out / "summary.json").exists()


# ----------------------------------------------------------------------------------------------- the Python API

def _api_cases():
    from memloc import analyses, locate
    from memloc.analyses import probes, scores
    from memloc.analyses.dimension import TwoNN
    from memloc.data import load_dataset
    from memloc.models import build_model
    from memloc.results import load_result, read_json
    from memloc.sweep import load_spec, run_sweep
    from memloc.train import Run, TrainConfig, load_checkpoint, train
    from memloc.validate import claim_output, int_list, number, safe_name

    t = np.linspace(0, 1, 100)
    grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)
    return [
        ("config-lr-inf", lambda w: TrainConfig(lr=math.inf).validate(), ConfigError, "'lr'.*finite"),
        ("config-momentum", lambda w: TrainConfig(momentum=2).validate(), ConfigError, r"'momentum'.*\[0, 1\]"),
        ("config-gamma", lambda w: TrainConfig(gamma=0).validate(), ConfigError, r"'gamma'.*\(0, inf\)"),
        ("config-milestones", lambda w: TrainConfig(milestones=[0]).validate(), ConfigError, "'milestones'"),
        ("config-eval-batch", lambda w: TrainConfig(eval_batch_size=0).validate(), ConfigError, "'eval_batch_size'"),
        ("config-noise-seed", lambda w: TrainConfig(noise_seed=1.5).validate(), ConfigError, "'noise_seed'"),
        ("config-epochs-bool", lambda w: TrainConfig(epochs=True).validate(), ConfigError, "'epochs'.*an int"),
        ("config-eval-each-epoch", lambda w: TrainConfig(eval_each_epoch="yes").validate(), ConfigError,
         "'eval_each_epoch'"),
        ("config-unknown-field", lambda w: TrainConfig.from_dict({"nosie": 0.1}), ConfigError, "nosie.*valid fields"),
        ("train-lr-inf", lambda w: train({**TINY_CFG, "lr": math.inf}, w / "api_new", progress=False), ConfigError,
         "'lr'"),
        ("train-hidden-zero", lambda w: train({**TINY_CFG, "model_kwargs": {"hidden": [0]}}, w / "api_new",
                                              progress=False), ConfigError, "'model_kwargs.hidden'"),
        ("train-data-typo", lambda w: train({**TINY_CFG, "dataset_kwargs": {"num_sample": 3}}, w / "api_new",
                                            progress=False), ConfigError, "num_sample.*valid keys"),
        ("train-out-file", lambda w: train(TINY_CFG, w / "afile", progress=False), OutputExistsError, "is a file"),
        ("load-dataset-typo", lambda w: load_dataset("digits", nope=1), ConfigError, "nope.*test_fraction"),
        ("build-model-zero", lambda w: build_model("mlp", (64,), 10, hidden=[0]), ConfigError, "hidden"),
        ("build-model-typo", lambda w: build_model("mlp", (64,), 10, hiden=[3]), ConfigError, "hiden.*hidden"),
        ("twonn-grid", lambda w: TwoNN().fit(grid), MemlocError, "TwoNN is undefined.*grid"),
        ("twonn-collinear", lambda w: TwoNN().fit(np.c_[t, 2 * t]), MemlocError, "evenly spaced"),
        ("ablate-n-per-group", lambda w: locate.ablate_examples(Run(w / "run"), -1), ConfigError, "'n_per_group'"),
        ("ablate-groups", lambda w: locate.ablate_examples(Run(w / "run"), 5, groups=["test"]), ConfigError,
         "'groups'.*'clean' and/or 'noisy'"),
        ("ablate-keep-weight", lambda w: locate.ablate_examples(Run(w / "run"), 5, keep_weight=math.nan),
         ConfigError, "'keep_weight'"),
        ("probe-max-examples", lambda w: probes.sample_ids(Run(w / "run"), max_examples=2), ConfigError,
         r"'max_examples'.*\[20, inf\)"),
        ("auroc-clean-run", lambda w: scores.auroc_table(scores.dynamics_scores(Run(w / "clean"))), ConfigError,
         "no 'noisy' examples"),
        ("dynamics-missing", lambda w: scores.dynamics_scores(Run(w / "nodyn")), InputFileError, "dynamics.parquet"),
        ("run-lm", lambda w: Run(w / "lmlike"), InputFileError, "language-model run"),
        ("read-json", lambda w: read_json(w / "badjson" / "config.json"), InputFileError, "config.json is not valid"),
        ("read-json-folder", lambda w: read_json(w / "run"), InputFileError, "is a folder"),
        ("load-result-garbage", lambda w: load_result(w / "garbage.parquet"), InputFileError,
         "garbage.parquet is not a readable parquet"),
        ("load-result-missing", lambda w: load_result(w / "nowhere.parquet"), InputFileError, "does not exist"),
        ("load-checkpoint-truncated", lambda w: load_checkpoint(w / "truncckpt/checkpoints/epoch_003.safetensors"),
         InputFileError, "corrupt or truncated"),
        ("load-checkpoint-missing", lambda w: load_checkpoint(w / "nowhere.safetensors"), InputFileError,
         "No checkpoint"),
        ("spec-name", lambda w: load_spec({"name": "../x", "grid": {"seed": [0]}}), ConfigError, "'name'"),
        ("spec-section", lambda w: load_spec({"grid": {"seed": [0]}, "method": {}}), ConfigError, "'method'"),
        ("sweep-executor", lambda w: run_sweep(w / "ok.toml", w / "api_sweep", executor="dask", progress=False),
         ConfigError, "'executor'.*local"),
        ("sweep-stale", lambda w: run_sweep(w / "ok.toml", w / "stale_sweep", progress=False), OutputExistsError,
         "train.epochs: 5 -> 2"),
        ("claim-user-folder", lambda w: claim_output(w / "userfolder", "probe", {}), OutputExistsError,
         "not empty"),
        ("claim-other-kind", lambda w: claim_output(w / "stale_investigation", "sweep", {}), OutputExistsError,
         "not a sweep"),
        ("number-bool", lambda w: number("n", True, integer=True), ConfigError, "'n'.*an int"),
        ("number-inf", lambda w: number("x", math.inf, lo=0), ConfigError, r"'x'.*finite number in \[0, inf\)"),
        ("int-list-empty", lambda w: int_list("--epochs", ","), ConfigError, "'--epochs'"),
        ("safe-name-slash", lambda w: safe_name("name", "a/b"), ConfigError, "plain file name"),
    ]


API_CASES = _api_cases()


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api(world, call, exc, pattern):
    before = _snapshot(world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=pattern) as info:
            call(world)
    assert isinstance(info.value, MemlocError) and isinstance(info.value, ValueError)
    assert _snapshot(world) == before


def test_validators_accept_exactly_the_valid_values():
    from memloc.validate import int_list, number, safe_name

    rng = np.random.default_rng(0)
    values = list(rng.normal(scale=10, size=200)) + [0.0, -0.0, 1.0, math.inf, -math.inf, math.nan, 1e300]
    for v in values:
        ok = math.isfinite(v) and 0 < v <= 1
        try:
            assert number("p", float(v), lo=0, hi=1, lo_open=True) == v and ok
        except ConfigError:
            assert not ok
    assert number("k", 3, lo=1, integer=True) == 3 and number("k", None, none_ok=True) is None
    assert int_list("--epochs", "0, 2,5") == [0, 2, 5] and int_list("--epochs", None) is None
    assert safe_name("name", "noise-0.1_a") == "noise-0.1_a"


def test_svcca_warns_when_it_has_too_few_examples():
    from memloc.analyses.similarity import svcca

    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="SVCCA with 100 examples.*biased upwards"):
        svcca(rng.normal(size=(100, 256)), rng.normal(size=(100, 256)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svcca(rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8)))  # plenty of examples: no warning


def test_rome_refuses_words_outside_the_vocabulary():
    from types import SimpleNamespace

    from memloc.data.facts import WordTokenizer
    from memloc.edit.rome import Request, _check_words

    tok = WordTokenizer(["alice", "lives", "in", "paris", "rome"])
    lm = SimpleNamespace(word=True, tokenizer=tok)
    _check_words(lm, [Request("{} lives in", "alice", "rome")])
    with pytest.raises(ConfigError, match=r"subject 'bob'.*\['bob'\].*<unk>"):
        _check_words(lm, [Request("{} lives in", "bob", "rome")])
    with pytest.raises(ConfigError, match=r"target_new 'london'"):
        _check_words(lm, [Request("{} lives in", "alice", "london")])
    with pytest.raises(ConfigError, match=r"prompt .*\['works'\]"):
        _check_words(lm, [Request("{} works in", "alice", "rome")])


def test_edit_undo_out_of_order_is_refused_and_in_order_restores():
    from memloc.edit.rome import Edit

    lin = torch.nn.Linear(3, 2)
    w0 = lin.weight.detach().clone()
    a = Edit({"weight": torch.ones(2, 3)})
    b = Edit({"weight": torch.full((2, 3), 2.0)})
    undo_a = a.apply(lin)
    undo_b = b.apply(lin)
    with pytest.raises(MemlocError, match="reverse order"):
        undo_a()
    assert torch.equal(lin.weight, w0 + 1 + 2)  # the refused undo changed nothing
    undo_b()
    undo_b()  # a second call does nothing
    undo_a()
    assert torch.equal(lin.weight, w0)


def test_ablation_leaves_out_examples_the_model_does_not_fit(world):
    from memloc import locate
    from memloc.train import Run, evaluate

    run = Run(world / "run")  # 3 epochs: most flipped labels are not fit
    fit = evaluate(run.model(), run.data().train)
    unfit_noisy = set(fit.example_id[~fit.correct]) & set(run.examples.example_id[run.examples.group == "noisy"])
    with pytest.warns(UserWarning, match="does not fit"):
        df = locate.ablate_examples(run, 4, max_units=4, eval_size=0, progress=False)
    assert not set(df.example_id) & unfit_noisy
    assert df.attrs["settings"]["unfit_excluded"]["noisy"] == len(unfit_noisy) > 0
