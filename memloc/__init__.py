"""memloc: locate memorization in neural networks and modify it where it lives.

The foundation: datasets with stable example ids and recorded label noise (:mod:`memloc.data`), models with
stable layer names (:mod:`memloc.models`), training with per-epoch checkpoints and per-example dynamics
(:mod:`memloc.train`), one hook vocabulary for capture and intervention (:mod:`memloc.hooks`) and one result
format (:mod:`memloc.results`).
"""
from .data import Dataset, from_arrays, inject_label_noise, load_dataset
from .hooks import ablate, capture, replace_parameters, scale_neurons, valid_sites
from .models import build_model, layer_names
from .results import load_result, make_result, save_result
from .train import Run, TrainConfig, evaluate, load_run, train
from .record import Recorder, from_checkpoints
from .data import from_torch
from .validate import ConfigError, InputFileError, MemlocError, OutputExistsError

__all__ = ["Dataset", "from_arrays", "inject_label_noise", "load_dataset", "ablate", "capture",
           "replace_parameters", "scale_neurons", "valid_sites", "build_model", "layer_names", "load_result",
           "make_result", "save_result", "Run", "TrainConfig", "evaluate", "load_run", "train", "Recorder",
           "from_checkpoints", "from_torch", "MemlocError", "ConfigError", "InputFileError", "OutputExistsError"]

_SUBMODULES = {"locate", "analyses", "edit", "ensemble", "sweep", "report", "hooks", "models", "data", "results", "cli",
               "record", "validate"}


def __getattr__(name: str):
    """``memloc.locate``, ``memloc.analyses`` ... are imported on first use (they pull in more dependencies);
    ``memloc.LM`` is :class:`memloc.models.lm.LM`, the language-model handle."""
    if name == "LM":
        from .models.lm import LM
        return LM
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'memloc' has no attribute {name!r}")
