import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    from memloc.data import load_digits
    return load_digits()


@pytest.fixture(scope="session")
def small_config():
    """A run that fits its flipped labels in a few seconds on one thread."""
    return {"dataset": "digits", "noise": 0.1, "model": "mlp", "model_kwargs": {"hidden": [256]},
            "lr": 1e-2, "batch_size": 64, "epochs": 100, "seed": 3}


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, small_config):
    """The small digits run, trained once per test session (read-only for tests)."""
    from memloc.train import train
    return train(small_config, tmp_path_factory.mktemp("runs") / "small", progress=False)
