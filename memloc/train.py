"""Training with a checkpoint per epoch and a per-example, per-epoch record of how each example was learned.

A run is a folder::

    config.json                      TrainConfig (+ versions)
    examples.parquet                 example_id, split, label, original_label, group
    checkpoints/epoch_000.safetensors   initialisation, then one per epoch (model weights and buffers)
    dynamics.parquet                 example_id, epoch, source, loss, correct, margin, confidence, prediction
    summary.json                     accuracies by group, epochs, seconds, seed, config (written last)
    state.pt                         optimiser state for resuming (torch.load(weights_only=True))
    data.safetensors                 only when the data was passed in rather than named in the config

``dynamics.parquet`` holds two sources: ``minibatch`` rows are measured on the training minibatch just before
the optimiser step, in train mode (Toneva et al.'s convention; train examples only), and ``eval`` rows come
from a full pass in eval mode after each epoch (epoch 0 = initialisation; train and test examples). ``loss``,
``correct``, ``margin`` (label logit minus the largest other logit) and ``confidence`` (softmax probability of
the label) are all measured against the *training* label, i.e. the flipped one for noisy examples.

Every file is written atomically and the run state last, so a run killed at any moment resumes from its last
completed epoch and ends with the same weights as an uninterrupted run (data order is a function of seed and
epoch, not of the process' history).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, inject_label_noise, load_dataset
from .hooks import batched_forward, require_eval
from .results import atomic_path, load_result, make_result, read_json, save_result, write_json

__all__ = ["TrainConfig", "train", "evaluate", "group_accuracy", "Run", "load_run", "save_checkpoint",
           "load_checkpoint", "PRECISIONS"]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "triangle", "step")
PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    """Everything that determines a run. Same config (and seed) -> same run, bit for bit on the same machine.

    Attributes:
        dataset, dataset_kwargs: a name from :data:`memloc.data.DATASETS` and its arguments.
        noise: fraction of training labels flipped (:func:`~memloc.data.inject_label_noise`), in [0, 1).
        model, model_kwargs: a name from :data:`memloc.models.MODELS` and its arguments.
        optimizer: ``sgd`` | ``adam`` | ``adamw``; lr, momentum (SGD), weight_decay.
        schedule: ``constant`` | ``cosine`` | ``triangle`` (linear warm-up for ``warmup`` of the steps, then
            linear decay to 0, as in Maini et al.) | ``step`` (x ``gamma`` at each of ``milestones`` epochs).
            Schedules span ``epochs`` (the maximum), also when training stops early.
        epochs: maximum number of epochs.
        stop_at_train_acc: stop after the first epoch whose eval-mode accuracy on *all* training examples
            (noisy ones against their flipped labels) reaches this; ``None`` trains exactly ``epochs``.
        eval_each_epoch: full evaluation pass after every epoch (train + test examples).
        seed: seeds model initialisation and data order; noise_seed (default: seed) seeds the label flips.
        precision: ``"fp32"`` or ``"bf16"`` (forward passes of training steps under ``torch.autocast`` in
            bfloat16; weights, optimiser and the evaluation passes stay float32).
        example_tied_dropout: ``None`` or ``{"sites": [...], "p_fixed": 0.2, "p_mem": 0.1}``
            (:class:`~memloc.models.dropout.ExampleTiedDropout`; ``sites`` default to the last hidden layer).
            Training and the eval pass use each training example's own mask (test examples: the expectation),
            and the summary also reports accuracy in the ``expect`` and ``drop`` modes.
    """

    dataset: str = "mnist1d"
    dataset_kwargs: dict = field(default_factory=dict)
    noise: float = 0.1
    noise_seed: int | None = None
    model: str = "cnn1d"
    model_kwargs: dict = field(default_factory=dict)
    optimizer: str = "adam"
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup: float = 0.1
    milestones: list = field(default_factory=list)
    gamma: float = 0.1
    batch_size: int = 128
    epochs: int = 300
    stop_at_train_acc: float | None = 1.0
    eval_each_epoch: bool = True
    eval_batch_size: int = 1024
    seed: int = 0
    example_tied_dropout: dict | None = None
    precision: str = "fp32"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            from .validate import ConfigError
            raise ConfigError(f"Unknown TrainConfig field(s) {sorted(unknown)}; valid fields are {sorted(names)}.")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def validate(self) -> "TrainConfig":
        """Check every field (type, range, known names, the dataset's and model's keyword arguments); raises
        :class:`~memloc.validate.ConfigError` naming the field and what is valid."""
        from .data import DATASETS
        from .models import MODELS, check_model_kwargs
        from .validate import ConfigError, call_keywords, number

        def need(ok: bool, name: str, valid: str):
            if not ok:
                raise ConfigError(f"The {name!r} parameter must be {valid}. Got {getattr(self, name)!r} instead.")

        need(self.dataset in DATASETS or self.dataset == "custom", "dataset", f"one of {sorted(DATASETS)}")
        need(self.model in MODELS or self.model == "custom", "model",
             f"one of {sorted(MODELS)} (or 'custom' with train(..., model=your_factory))")
        need(isinstance(self.dataset_kwargs, dict), "dataset_kwargs", "a dict")
        need(isinstance(self.model_kwargs, dict), "model_kwargs", "a dict")
        if self.dataset in DATASETS:
            call_keywords("dataset_kwargs", DATASETS[self.dataset], self.dataset_kwargs, what=f"dataset {self.dataset!r}")
        if self.model in MODELS:
            check_model_kwargs(self.model, self.model_kwargs)
        number("noise", self.noise, lo=0, hi=1, hi_open=True)
        number("noise_seed", self.noise_seed, integer=True, none_ok=True)
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {list(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, "schedule", f"one of {list(SCHEDULES)}")
        number("lr", self.lr, lo=0, lo_open=True)
        number("momentum", self.momentum, lo=0, hi=1)
        number("weight_decay", self.weight_decay, lo=0)
        number("warmup", self.warmup, lo=0, hi=1, hi_open=True)
        need(isinstance(self.milestones, list) and all(isinstance(m, int) and not isinstance(m, bool) and m >= 1
                                                       for m in self.milestones), "milestones", "a list of epochs >= 1")
        number("gamma", self.gamma, lo=0, lo_open=True)
        need(self.precision in PRECISIONS, "precision", f"one of {list(PRECISIONS)}")
        number("batch_size", self.batch_size, lo=1, integer=True)
        number("epochs", self.epochs, lo=1, integer=True)
        number("eval_batch_size", self.eval_batch_size, lo=1, integer=True)
        number("seed", self.seed, integer=True)
        number("stop_at_train_acc", self.stop_at_train_acc, lo=0, hi=1, lo_open=True, none_ok=True)
        need(isinstance(self.eval_each_epoch, bool), "eval_each_epoch", "true or false")
        etd = self.example_tied_dropout
        need(etd is None or (isinstance(etd, dict) and set(etd) <= {"sites", "p_fixed", "p_mem"}),
             "example_tied_dropout", "None or a dict with keys among ['sites', 'p_fixed', 'p_mem']")
        if etd is not None:
            if etd.get("p_fixed") is not None:
                number("p_fixed", etd["p_fixed"], lo=0, hi=1, hi_open=True)
            if etd.get("p_mem") is not None:
                number("p_mem", etd["p_mem"], lo=0, hi=1, lo_open=True)
            if etd.get("sites") is not None and not (isinstance(etd["sites"], list)
                                                     and all(isinstance(x, str) for x in etd["sites"])):
                raise ConfigError(f"The 'sites' parameter must be a list of layer names. Got {etd['sites']!r} "
                                  "instead.")
        return self


# ----------------------------------------------------------------------------------------------- evaluation

def _per_example(logits: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """loss, correct, margin, confidence, prediction for logits ``[B, K]`` against labels ``[B]``."""
    loss = F.cross_entropy(logits, y, reduction="none")
    label_logit = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    margin = label_logit - others.max(1).values
    pred = logits.argmax(1)
    conf = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    return {"loss": loss, "correct": pred == y, "margin": margin, "confidence": conf, "prediction": pred}


def _frame(example_id: torch.Tensor, stats: dict[str, torch.Tensor]) -> pd.DataFrame:
    return pd.DataFrame({
        "example_id": example_id.numpy().astype(np.int64),
        "loss": stats["loss"].detach().float().numpy(),
        "correct": stats["correct"].numpy(),
        "margin": stats["margin"].detach().float().numpy(),
        "confidence": stats["confidence"].detach().float().numpy(),
        "prediction": stats["prediction"].numpy().astype(np.int64),
    })


def evaluate(model: nn.Module, data: Dataset, batch_size: int = 1024, progress: bool = False, etd=None,
             etd_mode: str = "own") -> pd.DataFrame:
    """Per-example ``example_id, loss, correct, margin, confidence, prediction`` against ``data.y``.

    The model must be in eval mode. Labels are the training labels (flipped ones for noisy examples).
    With an :class:`~memloc.models.dropout.ExampleTiedDropout` ``etd``, ``etd_mode`` is ``"expect"``,
    ``"drop"``, or ``"own"``: each training example with its own memorization mask (how it was trained;
    test examples, which have none, get the expectation).
    """
    require_eval(model, "evaluate()")
    if etd is not None and etd_mode == "own":
        train, test = data.subset(data.split == "train"), data.subset(data.split != "train")
        parts = [evaluate(model, test, batch_size, etd=etd, etd_mode="expect")]
        for s in range(0, len(train), batch_size):
            sub = train.subset(np.arange(s, min(s + batch_size, len(train))))
            with etd.apply(model, "train", ids=sub.example_id):
                parts.append(evaluate(model, sub, batch_size))
        order = {int(e): i for i, e in enumerate(data.example_id.tolist())}
        df = pd.concat(parts, ignore_index=True)
        return df.iloc[np.argsort([order[e] for e in df.example_id])].reset_index(drop=True)
    if etd is not None:
        with etd.apply(model, etd_mode):
            return evaluate(model, data, batch_size, progress)
    parts = []
    for sl, logits in batched_forward(model, data.x, batch_size, progress, desc="evaluate"):
        parts.append(_frame(data.example_id[sl], _per_example(logits.float().cpu(), data.y[sl])))
    return pd.concat(parts, ignore_index=True) if parts else _frame(torch.empty(0, dtype=torch.long), {
        k: torch.empty(0) for k in ("loss", "correct", "margin", "confidence", "prediction")})


def group_accuracy(per_example: pd.DataFrame, examples: pd.DataFrame) -> dict[str, float]:
    """Accuracy per group (``clean``, ``noisy``, ``test``) and over all training examples (``train``)."""
    df = per_example.merge(examples[["example_id", "group", "split"]], on="example_id")
    out = {g: float(df.loc[df.group == g, "correct"].mean()) if (df.group == g).any() else float("nan")
           for g in ("clean", "noisy", "test")}
    out["train"] = float(df.loc[df.split == "train", "correct"].mean())
    return out


# ----------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(model_or_state: nn.Module | dict, path: str | Path, **metadata: Any) -> Path:
    """Atomically save a model's state_dict (parameters and buffers) as safetensors."""
    from safetensors.torch import save_file

    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    return Path(path)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors checkpoint as a state_dict."""
    from safetensors.torch import load_file

    from .validate import InputFileError

    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"No checkpoint at {path}.")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise InputFileError(f"The checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); retrain "
                             "the run (--overwrite) or restore the file.") from None


# ----------------------------------------------------------------------------------------------- the run

def _ckpt_name(epoch: int) -> str:
    return f"epoch_{epoch:03d}.safetensors"


class Run:
    """A training run folder. ``Run(path)`` reads it; nothing is loaded until asked for.

    A run is anything with a model factory, checkpoints by epoch and a dataset with example ids and groups:
    :func:`train` writes one, :class:`~memloc.record.Recorder` records one from your own training loop, and
    :meth:`Run.from_checkpoints` adapts your saved state dicts. Every run-level method takes it.

    Args:
        path: the run folder.
        model: how to build the run's model when the folder cannot say: a zero-argument factory (your model
            class, a function), an importable ``"package.module:name"`` string, or an ``nn.Module`` instance
            (see :mod:`memloc.models.factory`). Runs of memloc's registered models, and runs whose factory was
            recorded as importable, need none.
        device: where :meth:`model` puts models (``"cpu"``, ``"cuda"``, ``"auto"``); every run-level method
            works on that device.

    Attributes/methods: ``config`` (:class:`TrainConfig`: the recipe that trained it), ``summary`` (dict,
    ``None`` while unfinished), ``examples`` and ``dynamics`` (DataFrames), ``epochs`` (saved checkpoint epochs),
    ``checkpoint(epoch)`` (state_dict), ``model(epoch=None)`` (the model in eval mode, last epoch by default),
    ``new_model(seed)`` (a freshly initialised model of the run's own architecture, for everything that
    retrains), ``factory``, ``data()`` (the exact Dataset it was trained on).
    """

    def __init__(self, path: str | Path, model: Any = None, device: str | torch.device = "cpu"):
        from .hooks import resolve_device
        from .models.factory import as_factory

        self.path = Path(path)
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(f"{self.path} is not a memloc run (no config.json). Create one with "
                                    "memloc.train(...), memloc.Recorder(...), memloc.Run.from_checkpoints(...) or "
                                    "`memloc train --out ...`.")
        raw = read_json(self.path / "config.json")
        if not isinstance(raw, dict) or "train" not in raw:
            from .validate import InputFileError

            if (self.path / "world.json").exists():
                raise InputFileError(f"{self.path} is a language-model run (memloc lm train), not a classifier run; "
                                     "use `memloc lm ...`, `memloc edit` or `memloc unlearn` with it.")
            raise InputFileError(f"{self.path / 'config.json'} is not the config of a memloc run (no 'train' "
                                 "section).")
        self.config = TrainConfig.from_dict(raw["train"])
        self.info = raw
        self.device = resolve_device(device)
        self._factory = None if model is None else as_factory(model, raw.get("input_shape"), raw.get("num_classes"))

    def __repr__(self) -> str:
        state = "finished" if self.finished else f"unfinished, {max(len(self.epochs) - 1, 0)} epochs"
        return (f"Run({str(self.path)!r}, {self.model_name} on {self.config.dataset}, noise={self.config.noise}, "
                f"{state})")

    @property
    def model_name(self) -> str:
        return self.info.get("model_class") or self.config.model

    @property
    def recipe_known(self) -> bool:
        """Whether the run recorded how it was trained (``False`` for adapted checkpoints given no ``config``:
        methods that retrain then use memloc's default :class:`TrainConfig` and say so)."""
        return self.info.get("recipe", "given") == "given"

    @property
    def factory(self):
        """The run's :class:`~memloc.models.factory.ModelFactory` (see ``model=`` of the constructor)."""
        from .models import MODELS
        from .models.factory import as_factory, factory_from_spec

        if self._factory is None:
            spec = self.info.get("model_factory")
            if self.config.model in MODELS:
                self._factory = as_factory(self.config.model, self.info["input_shape"], self.info["num_classes"],
                                           **self.config.model_kwargs)
            elif spec:
                try:
                    self._factory = factory_from_spec(spec)
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{self.path} records its model factory as {spec.get('name')!r}, which cannot be "
                                     f"used here ({e}). Open the run with memloc.Run(path, model=...) (CLI: "
                                     "--model-factory package.module:name).") from None
            else:
                raise ValueError(
                    f"{self.path} holds a user model ({self.model_name}) that memloc cannot rebuild from the folder. "
                    f"Open the run with memloc.Run({str(self.path)!r}, model=YourModel) (a zero-argument factory, "
                    "e.g. the model class, or a model instance); on the command line pass --model-factory "
                    "package.module:name.")
        return self._factory

    def warn_default_recipe(self, what: str) -> None:
        """Warn (once per call site) that ``what`` retrains with memloc's default recipe."""
        if not self.recipe_known:
            import warnings
            c = self.config
            warnings.warn(f"{self.path} did not record how it was trained, so {what} uses memloc's default recipe "
                          f"({c.optimizer} lr={c.lr}, batch {c.batch_size}, {c.schedule} schedule, at most {c.epochs} "
                          "epochs). Pass config={...} (TrainConfig fields) to Run.from_checkpoints or Recorder to use "
                          "your own.", stacklevel=3)

    @property
    def finished(self) -> bool:
        return (self.path / "summary.json").exists()

    @property
    def summary(self) -> dict | None:
        return read_json(self.path / "summary.json") if self.finished else None

    @property
    def examples(self) -> pd.DataFrame:
        return load_result(self.path / "examples.parquet")

    @property
    def dynamics(self) -> pd.DataFrame:
        if (self.path / "dynamics.parquet").exists():
            return load_result(self.path / "dynamics.parquet")
        parts = sorted((self.path / "dynamics").glob("epoch_*.parquet"))
        return pd.concat([load_result(p) for p in parts], ignore_index=True) if parts else pd.DataFrame()

    @property
    def epochs(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in (self.path / "checkpoints").glob("epoch_*.safetensors"))

    def checkpoint(self, epoch: int | None = None) -> dict[str, torch.Tensor]:
        epochs = self.epochs
        if not epochs:
            raise ValueError(f"{self.path} has no checkpoints.")
        epoch = epochs[-1] if epoch is None else epoch
        if epoch not in epochs:
            raise ValueError(f"No checkpoint for epoch {epoch} in {self.path}; saved epochs are {epochs}.")
        return load_checkpoint(self.path / "checkpoints" / _ckpt_name(epoch))

    def data(self) -> Dataset:
        return _load_run_data(self.path, self.config)

    def etd(self):
        """The run's example-tied dropout (apply it with ``run.etd().apply(model, mode)``), or ``None``."""
        if self.config.example_tied_dropout is None:
            return None
        return make_etd(self.config, self.model(), self.data())

    def new_model(self, seed: int | None = None, device: str | torch.device | None = None) -> nn.Module:
        """A new model of the run's own architecture, initialised from ``seed`` (the run's seed by default), on
        the run's device, in training mode: what every method that retrains builds."""
        model = self.factory.new(self.config.seed if seed is None else seed)
        return model.to(self.device if device is None else device)

    def model(self, epoch: int | None = None, device: str | torch.device | None = None) -> nn.Module:
        """The model at ``epoch`` (default: the last checkpoint), on the run's device, in eval mode."""
        from .models.factory import load_state

        epoch = self.epochs[-1] if epoch is None and self.epochs else epoch
        state = self.checkpoint(epoch)
        model = load_state(self.factory.architecture(), state, what=f"The checkpoint of epoch {epoch} in {self.path}")
        return model.to(self.device if device is None else device).eval()

    @classmethod
    def from_checkpoints(cls, model: Any, checkpoints: Any, data: Dataset, out: str | Path, **kwargs: Any) -> "Run":
        """Adapt your own saved checkpoints into a run folder (see :func:`memloc.record.from_checkpoints`)."""
        from .record import from_checkpoints

        return from_checkpoints(model, checkpoints, data, out, **kwargs)


def load_run(path: str | Path, model: Any = None, device: str | torch.device = "cpu") -> Run:
    return Run(path, model=model, device=device)


def _build_data(cfg: TrainConfig) -> Dataset:
    data = load_dataset(cfg.dataset, **cfg.dataset_kwargs)
    if cfg.noise > 0:
        data = inject_label_noise(data, cfg.noise, seed=cfg.seed if cfg.noise_seed is None else cfg.noise_seed)
    return data


def _load_run_data(path: Path, cfg: TrainConfig) -> Dataset:
    from safetensors.torch import load_file

    examples = load_result(path / "examples.parquet")
    if (path / "data.safetensors").exists():
        t = load_file(str(path / "data.safetensors"))
        info = read_json(path / "config.json")
        data = Dataset(x=t["x"], y=t["y"], original_label=t["original_label"], example_id=t["example_id"],
                       split=examples["split"].to_numpy(object), group=examples["group"].to_numpy(object),
                       num_classes=info["num_classes"], name=info.get("data_name", "custom"),
                       meta=info.get("data_meta", {}))
    else:
        data = _build_data(cfg)
    if not (np.array_equal(data.example_id.numpy(), examples.example_id.values)
            and np.array_equal(data.y.numpy(), examples.label.values)):
        from .validate import InputFileError
        raise InputFileError(f"The data rebuilt for {path} does not match its examples.parquet (a different "
                           "dataset version?). The run cannot be analysed with these examples.")
    return data


def _lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    t = step / max(total, 1)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        if cfg.warmup and t < cfg.warmup:
            return t / cfg.warmup
        u = (t - cfg.warmup) / max(1e-12, 1 - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(u, 1.0)))
    if cfg.schedule == "triangle":
        if cfg.warmup and t < cfg.warmup:
            return t / cfg.warmup
        return max(0.0, (1 - t) / max(1e-12, 1 - cfg.warmup))
    raise AssertionError(cfg.schedule)


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _config_dict(config: TrainConfig | dict | None, overrides: dict) -> dict[str, Any]:
    if config is None:
        cfg_dict: dict[str, Any] = {}
    elif isinstance(config, TrainConfig):
        cfg_dict = config.to_dict()
    elif isinstance(config, dict):
        cfg_dict = dict(config)
    else:
        raise TypeError(f"config must be a TrainConfig, a dict or None; got {type(config).__name__}.")
    cfg_dict.update(overrides)
    return cfg_dict


def _run_info(cfg: TrainConfig, data: Dataset, factory, model: nn.Module, **extra: Any) -> dict[str, Any]:
    """What ``config.json`` holds: the recipe, the data's shape and classes, the model's class and factory."""
    from .models.factory import describe

    return {"train": cfg.to_dict(), "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "data_name": data.name, "data_meta": data.meta, "model_class": describe(model),
            "model_factory": factory.spec, "memloc_version": _version(), "torch_version": torch.__version__, **extra}


def _claim_folder(out: Path, overwrite: bool) -> None:
    """Refuse to write into an existing non-empty folder unless ``overwrite`` (then it is replaced)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            what = "holds a memloc run" if (out / "config.json").exists() else "exists and is not empty"
            raise FileExistsError(f"{out} {what}; refusing to write into it. Choose another folder, or pass "
                                  "overwrite=True (--overwrite) to replace it.")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()


def _write_run_start(out: Path, info: dict, data: Dataset, custom_data: bool) -> None:
    """The files that make ``out`` a run folder; ``config.json`` last (its presence marks a run)."""
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "dynamics").mkdir(exist_ok=True)
    if custom_data:
        from safetensors.torch import save_file
        with atomic_path(out / "data.safetensors") as tmp:
            save_file({"x": data.x.contiguous().cpu(), "y": data.y.cpu(), "original_label": data.original_label.cpu(),
                       "example_id": data.example_id.cpu()}, str(tmp))
    save_result(make_result(data.examples(), dataset=data.name, **data.meta.get("noise", {})),
                out / "examples.parquet")
    write_json(info, out / "config.json")


def _eval_rows(model: nn.Module, data: Dataset, examples: pd.DataFrame, epoch: int, batch_size: int,
               etd=None) -> tuple[pd.DataFrame, dict[str, float]]:
    """The ``source="eval"`` dynamics rows of one epoch and the group accuracies (model left in eval mode)."""
    model.eval()
    df = evaluate(model, data, batch_size, etd=etd)
    acc = group_accuracy(df, examples)
    df.insert(1, "epoch", epoch)
    df.insert(2, "source", "eval")
    return df, acc


def train(config: TrainConfig | dict | None = None, out: str | Path | None = None, *, data: Dataset | None = None,
          model: Any = None, device: str | torch.device = "cpu", init: dict[str, torch.Tensor] | None = None,
          resume: bool = True, overwrite: bool = False, progress: bool = True,
          on_epoch_end: Callable[[int, dict], Any] | None = None, **overrides: Any) -> Run:
    """Train a model on a (noisy-label) dataset, keeping a checkpoint per epoch and per-example dynamics.

    Args:
        config: a :class:`TrainConfig`, a dict of its fields, or ``None`` for the default testbed
            (MNIST-1D 4000/1000, 10% flipped labels, 3-layer 1-D CNN with BatchNorm, Adam 3e-3, batch 128,
            trained until 100% of training labels, flipped ones included, are fit).
        out: the run folder (required).
        data: train on this Dataset instead of the one the config names; it is saved in the run
            (``data.safetensors``). Label noise from ``config.noise`` is injected unless it has some already.
        model: train *your* model instead of the registered ``config.model``: a zero-argument factory (e.g. your
            model class), an importable ``"package.module:name"`` or an ``nn.Module`` instance
            (:mod:`memloc.models.factory`). It is initialised with ``config.seed``; ``config.model`` becomes
            ``"custom"`` and the run records the class (and the factory, when it can be imported back).
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"auto"``; ``config.precision="bf16"`` adds
            bfloat16 autocast to the training steps. The data is moved to the device once.
        init: start from this state dict instead of the seeded initialisation (the unlearning oracle starts
            from the original run's epoch-0 weights).
        resume: if ``out`` holds an unfinished run with the same config, continue from its last completed
            epoch (a finished one is returned as is). ``overwrite=True`` deletes an existing run instead.
        progress: show a progress bar (one tick per epoch).
        on_epoch_end: called as ``fn(epoch, metrics)`` after each epoch is safely on disk.
        **overrides: TrainConfig fields overriding ``config`` (``train(out="runs/a", epochs=50)``).
    Returns the :class:`Run` (holding the model factory, on ``device``).
    """
    from tqdm.auto import tqdm

    from .hooks import resolve_device
    from .models.factory import as_factory, load_state

    if out is None:
        raise ValueError("train() needs out=: the folder the run is written to.")
    cfg_dict = _config_dict(config, overrides)
    if data is not None:
        cfg_dict["dataset"] = "custom"
    if model is not None:
        cfg_dict["model"] = "custom"
        cfg_dict.setdefault("model_kwargs", {})
    cfg = TrainConfig.from_dict(cfg_dict).validate()
    dev = resolve_device(device)
    out = Path(out)

    if data is None:
        data = _build_data(cfg)
    elif cfg.noise > 0 and not (data.group == "noisy").any():
        data = inject_label_noise(data, cfg.noise, seed=cfg.seed if cfg.noise_seed is None else cfg.noise_seed)

    # built before anything is written, so a model that does not fit the data leaves no folder behind
    factory = as_factory(cfg.model if model is None else model, data.input_shape, data.num_classes,
                         **(cfg.model_kwargs if model is None else {}))
    net = factory.new(cfg.seed)
    if init is not None:
        load_state(net, init, what="The initial state dict (init=)")
    _check_forward(net, data)
    net = net.to(dev)
    etd = make_etd(cfg, net, data)
    info = _run_info(cfg, data, factory, net)
    opt = _make_optimizer(cfg, net)  # also before anything is written
    if out.exists() and not out.is_dir():
        from .validate import OutputExistsError
        raise OutputExistsError(f"The output {out} is a file, not a folder; choose a folder for the run.")
    if (out / "config.json").exists() and not overwrite:
        old = read_json(out / "config.json")
        if old.get("train") != info["train"]:
            diff = {k: (old.get("train", {}).get(k), v) for k, v in info["train"].items()
                    if old.get("train", {}).get(k) != v}
            raise FileExistsError(f"{out} holds a run with a different config {diff} (old, new). Choose "
                                  "another folder, or pass overwrite=True (--overwrite) to replace it.")
        if old.get("model_class", info["model_class"]) != info["model_class"]:
            raise FileExistsError(f"{out} holds a run of {old.get('model_class')}, not {info['model_class']}. Choose "
                                  "another folder, or pass overwrite=True (--overwrite) to replace it.")
        if not resume:
            raise FileExistsError(f"{out} already holds a run; pass resume=True or overwrite=True.")
        if (out / "summary.json").exists():
            return Run(out, model=factory, device=dev)
    else:
        _claim_folder(out, overwrite)
        _write_run_start(out, info, data, cfg.dataset == "custom")
    ckdir, dyndir = out / "checkpoints", out / "dynamics"  # parts are written with their folder (atomic_path)
    examples = data.examples()

    train_data = data.train
    n_train = len(train_data)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    x_dev, y_dev = train_data.x.to(dev), train_data.y.to(dev)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else contextlib.nullcontext())

    def eval_pass(epoch: int) -> tuple[pd.DataFrame, dict[str, float]]:
        df, acc = _eval_rows(net, data, examples, epoch, cfg.eval_batch_size, etd)
        net.train()
        return df, acc

    state_path = out / "state.pt"
    history: list[dict] = []
    if state_path.exists():
        try:
            st = torch.load(state_path, weights_only=True, map_location="cpu")
        except Exception as e:  # truncated or foreign: only possible if something outside memloc damaged it
            from .validate import InputFileError
            raise InputFileError(f"{state_path} is corrupt or truncated ({type(e).__name__}); the run cannot resume. "
                                 "Pass overwrite=True (--overwrite) to train it again.") from None
        start, seconds, history, done = st["epoch"] + 1, st["seconds"], st["history"], st["done"]
        load_state(net, load_checkpoint(ckdir / _ckpt_name(st["epoch"])), what=f"The checkpoint of {out}")
        opt.load_state_dict(st["optimizer"])
        for p in list(ckdir.glob("epoch_*.safetensors")) + list(dyndir.glob("epoch_*.parquet")):
            if int(p.name.split("_")[1].split(".")[0]) > st["epoch"]:
                p.unlink()  # a partly written later epoch
    else:
        start, seconds, done = 1, 0.0, False
        save_checkpoint(net, ckdir / _ckpt_name(0), epoch=0)
        df0, acc0 = eval_pass(0)
        save_result(make_result(df0, epoch=0), dyndir / "epoch_000.parquet")
        history.append({"epoch": 0, **acc0})
        with atomic_path(state_path) as tmp:
            torch.save({"epoch": 0, "seconds": 0.0, "history": history, "done": False,
                        "optimizer": opt.state_dict()}, tmp)

    bar = tqdm(total=cfg.epochs, initial=start - 1, desc=f"train {cfg.model if model is None else factory.name}"
               f"/{data.name}", disable=not progress, unit="ep")
    net.train()
    for epoch in range(start, cfg.epochs + 1):
        if done:
            break
        t0 = time.perf_counter()
        order = _epoch_order(cfg.seed, epoch, n_train)
        records: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            xb, yb = x_dev[idx.to(dev)], y_dev[idx.to(dev)]
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _step_factor(cfg, (epoch - 1) * steps_per_epoch + b, total_steps, epoch)
            with autocast:
                if etd is not None:
                    with etd.apply(net, "train", ids=train_data.example_id[idx]):
                        logits = net(xb)
                else:
                    logits = net(xb)
            stats = _per_example(logits.float(), yb)
            if not torch.isfinite(stats["loss"]).all():
                raise FloatingPointError(f"The training loss became {stats['loss'].sum().item()} at epoch {epoch}, "
                                         f"step {b + 1}: the run diverged (lr={cfg.lr} is probably too high). "
                                         f"Nothing after epoch {epoch - 1} was saved.")
            opt.zero_grad(set_to_none=True)
            stats["loss"].mean().backward()
            opt.step()
            records.append((idx, {k: v.detach() for k, v in stats.items()}))
        pos = torch.cat([r[0] for r in records])
        cat = {k: torch.cat([r[1][k] for r in records]).cpu() for k in records[0][1]}
        order_back = torch.argsort(pos)  # rows sorted by position in the train split = by example id
        mb = _frame(train_data.example_id[pos[order_back]], {k: v[order_back] for k, v in cat.items()})
        mb.insert(1, "epoch", epoch)
        mb.insert(2, "source", "minibatch")
        parts = [mb]
        if cfg.eval_each_epoch:
            df, acc = eval_pass(epoch)
            parts.append(df)
        else:
            acc = group_accuracy(mb, examples)
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch, **acc})
        done = (cfg.stop_at_train_acc is not None and acc["train"] >= cfg.stop_at_train_acc) or epoch == cfg.epochs
        save_result(make_result(pd.concat(parts, ignore_index=True), epoch=epoch), dyndir / f"epoch_{epoch:03d}.parquet")
        save_checkpoint(net, ckdir / _ckpt_name(epoch), epoch=epoch)
        with atomic_path(state_path) as tmp:
            torch.save({"epoch": epoch, "seconds": seconds, "history": history, "done": done,
                        "optimizer": opt.state_dict()}, tmp)
        bar.update(1)
        bar.set_postfix(clean=f"{acc['clean']:.3f}", noisy=f"{acc['noisy']:.3f}", test=f"{acc['test']:.3f}")
        if on_epoch_end is not None:
            on_epoch_end(epoch, dict(acc))
    bar.close()
    _finalize(out, cfg, data, examples, net, history, seconds, etd, device=str(dev), source="memloc.train")
    return Run(out, model=factory, device=dev)


def _check_forward(model: nn.Module, data: Dataset) -> None:
    """One eval-mode forward pass on two examples: the model must map the data's inputs to ``[B, K]`` logits."""
    was = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(data.x[:2].to(next(iter(model.parameters()), torch.empty(0)).device))
    except Exception as e:
        raise ValueError(f"The model ({type(model).__name__}) cannot take this data's inputs of shape "
                         f"{list(data.input_shape)}: {type(e).__name__}: {e}") from None
    finally:
        for m, w in zip(model.modules(), was):
            m.training = w
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != data.num_classes:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"The model must return logits [batch, {data.num_classes}] for this data "
                         f"({data.num_classes} classes); it returned {shape}.")


def make_etd(cfg: TrainConfig, model: nn.Module, data: Dataset):
    """The run's :class:`~memloc.models.dropout.ExampleTiedDropout`, or ``None``; sites are validated."""
    from .hooks import resolve_sites
    from .models import layer_names
    from .models.dropout import ExampleTiedDropout

    if cfg.example_tied_dropout is None:
        return None
    spec = dict(cfg.example_tied_dropout)
    sites = spec.pop("sites", None) or layer_names(model)[-1:]
    resolve_sites(model, sites)
    return ExampleTiedDropout(sites, int(data.example_id.max()) + 1, seed=cfg.seed, **spec)


def _step_factor(cfg: TrainConfig, step: int, total: int, epoch: int) -> float:
    if cfg.schedule == "step":
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch > m)
    return _lr_factor(cfg, step, total)


def _finalize(out: Path, cfg: TrainConfig, data: Dataset, examples: pd.DataFrame, model: nn.Module,
              history: list[dict], seconds: float, etd=None, **extra: Any) -> None:
    """Merge the per-epoch dynamics into ``dynamics.parquet``, evaluate the final model, write ``summary.json``.

    The merged file is written (atomically) before the per-epoch parts are deleted, and a rerun after a kill
    anywhere in here redoes the merge from whatever parts are left plus the merged file, so no row is lost.
    """
    dyndir = out / "dynamics"
    parts = sorted(dyndir.glob("epoch_*.parquet"))
    merged = out / "dynamics.parquet"
    if parts:
        frames = [load_result(p) for p in parts]
        if merged.exists():  # a previous finalisation was killed while deleting the parts
            old = load_result(merged)
            have = set(pd.concat(frames).epoch.unique())
            frames = [old[~old.epoch.isin(have)]] + frames
        dyn = pd.concat(frames, ignore_index=True).sort_values(["epoch", "source"], kind="stable",
                                                              ignore_index=True)
        dyn["source"] = dyn["source"].astype("category")
        save_result(make_result(dyn, seed=cfg.seed, config=cfg.to_dict()), merged)
    shutil.rmtree(dyndir, ignore_errors=True)
    model.eval()
    final = evaluate(model, data, cfg.eval_batch_size, etd=etd)
    acc = group_accuracy(final, examples)
    etd_summary = None
    if etd is not None:
        etd_summary = {"settings": etd.to_dict()}
        for mode in ("own", "expect", "drop"):
            etd_summary[mode] = group_accuracy(evaluate(model, data, cfg.eval_batch_size, etd=etd, etd_mode=mode),
                                               examples)
    noisy = examples[examples.group == "noisy"]
    orig = final.merge(noisy[["example_id", "original_label"]], on="example_id")
    fit_epoch = next((h["epoch"] for h in history if h["train"] >= 1.0), None)
    noisy_fit = next((h["epoch"] for h in history if h.get("noisy", 0) >= 1.0 and h["epoch"] > 0), None)
    summary = {
        "train_acc": acc["train"], "train_acc_clean": acc["clean"], "train_acc_noisy": acc["noisy"],
        "noisy_acc_original_label": float((orig.prediction == orig.original_label).mean()) if len(orig) else None,
        "test_acc": acc["test"], "epochs": history[-1]["epoch"], "fit_epoch": fit_epoch,
        "noisy_fit_epoch": noisy_fit, "seconds": round(seconds, 3), "seed": cfg.seed,
        "n": {g: int((examples.group == g).sum()) for g in ("clean", "noisy", "test")},
        "chance": 1.0 / data.num_classes, "threads": torch.get_num_threads(), "config": cfg.to_dict(),
        "model_class": read_json(out / "config.json").get("model_class"), "data_name": data.name,
        "history": history, **extra,
    }
    if etd_summary is not None:
        summary["example_tied_dropout"] = etd_summary
    write_json(summary, out / "summary.json")


def format_summary(summary: dict, path: str | Path | None = None) -> str:
    """A few lines a person can read: accuracies by group with the seed and config that produced them."""
    c = summary["config"]
    n = summary["n"]
    lines = [
        f"run: {path}" if path else None,
        "setting: " + " ".join(str(x) for x in (summary.get("model_class") if c["model"] == "custom" else c["model"],
                                                 c['model_kwargs'] or "", "on",
                                                 summary.get("data_name", c["dataset"]) if c["dataset"] == "custom"
                                                 else c['dataset'], c['dataset_kwargs'] or "") if x != "")
        + f", {c['noise']:.0%} flipped labels "
        f"(noise_seed={c['noise_seed'] if c['noise_seed'] is not None else c['seed']}), seed={c['seed']}, "
        f"{c['optimizer']} lr={c['lr']} {c['schedule']}, batch {c['batch_size']}",
        f"trained {summary['epochs']} epochs in {summary['seconds']:.1f} s ({summary['threads']} threads); "
        f"100% train accuracy first at epoch {summary['fit_epoch']}",
        f"train accuracy, clean examples ({n['clean']}):                      {summary['train_acc_clean']:.4f}",
        f"train accuracy, noisy examples vs their flipped labels ({n['noisy']}): {summary['train_acc_noisy']:.4f}",
        f"noisy examples predicted as their original label:            "
        f"{summary['noisy_acc_original_label'] if summary['noisy_acc_original_label'] is None else format(summary['noisy_acc_original_label'], '.4f')}",
        f"test accuracy ({n['test']}, chance {summary['chance']:.2f}):                          {summary['test_acc']:.4f}",
    ]
    return "\n".join(line for line in lines if line is not None)


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("memloc")
    except Exception:
        return "unknown"
