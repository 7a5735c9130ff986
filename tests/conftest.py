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


@pytest.fixture(scope="session")
def lm(tmp_path_factory):
    """A 2-layer language-model testbed on a 40-subject fact world with canaries (read-only for tests)."""
    pytest.importorskip("transformer_lens")
    from memloc.data.facts import make_fact_world
    from memloc.models.transformer import train_lm

    world = make_fact_world(40, n_canaries=4, canary_digits=3, canary_repeats=(1, 8), seed=0)
    return train_lm(world, tmp_path_factory.mktemp("lm") / "lm", n_layers=2, d_model=64, d_mlp=256, epochs=200,
                    lr=3e-3, progress=False)


@pytest.fixture(scope="session")
def lm_testbed(tmp_path_factory):
    """The default language-model testbed (4 layers, d_model 128, 120 subjects; ~50 s on one thread), on which
    edits at the subject's first MLP work as in the paper. Read-only for tests."""
    pytest.importorskip("transformer_lens")
    from memloc.data.facts import make_fact_world
    from memloc.models.transformer import train_lm

    return train_lm(make_fact_world(), tmp_path_factory.mktemp("lm") / "testbed", progress=False)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A GPT-2 with a byte-level BPE tokenizer (BOS = EOS = PAD = 0), trained locally on tests/hf_world.py's made-up
    countries, canaries and repeated sequences, saved with save_pretrained (~15 s on one thread). Read-only."""
    pytest.importorskip("transformers")
    import hf_world

    folder = tmp_path_factory.mktemp("hf") / "gpt2-bpe"
    hf_world.build(folder)
    return folder
