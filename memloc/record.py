"""Runs from your own training: a :class:`Recorder` for your loop, :func:`from_checkpoints` for your saved files.

Both write an ordinary run folder (see :mod:`memloc.train`), so every run-level method (rewinding, retraining,
scores, probes, ensembles, unlearning) works on your model, your data and your device::

    data = memloc.from_arrays(x, y_noisy, x_test, y_test, original_label=y_true)
    rec = memloc.Recorder("runs/mine", model, data, config={"optimizer": "sgd", "lr": 0.05, "batch_size": 64})
    for epoch in range(epochs):
        for ids in batches:                       # your loader must give each example's id
            logits = model(data.x[ids])
            rec.batch(ids, logits)                # before the optimiser step (Toneva et al.'s convention)
            loss = F.cross_entropy(logits, y[ids]); opt.zero_grad(); loss.backward(); opt.step()
        rec.epoch_end(model)                      # checkpoint + evaluation pass over all examples
    run = rec.finish()

    run = memloc.Run.from_checkpoints(MyNet, "ckpts/", data, out="runs/mine")   # epoch_{N}.pt files

``config`` (fields of :class:`~memloc.train.TrainConfig`: optimizer, lr, momentum, weight_decay, batch_size,
schedule, epochs, seed) records how you trained, so that methods which retrain (layer retraining, second-split
forgetting, holdout retraining, ensembles, the unlearning oracle) use your recipe; without it they use
memloc's default and warn.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data import Dataset
from .results import make_result, save_result
from .results import write_json
from .train import (Run, TrainConfig, _check_forward, _ckpt_name, _claim_folder, _eval_rows, _finalize, _frame,
                    _per_example, _run_info, _write_run_start, load_checkpoint, save_checkpoint)
from .validate import UnknownKeyError

__all__ = ["Recorder", "from_checkpoints", "load_state_file"]

_RECIPE_FIELDS = {"optimizer", "lr", "momentum", "weight_decay", "schedule", "warmup", "milestones", "gamma",
                  "batch_size", "epochs", "stop_at_train_acc", "seed", "eval_batch_size", "precision"}


def _user_config(config: TrainConfig | Mapping[str, Any] | None, data: Dataset, epochs: int | None) -> tuple[TrainConfig, str]:
    """The run's TrainConfig from the user's recipe (``dataset``/``model`` are ``custom``, noise from the data)."""
    if isinstance(config, TrainConfig):
        config = config.to_dict()
    given = dict(config or {})
    unknown = set(given) - _RECIPE_FIELDS - {"dataset", "model", "model_kwargs", "dataset_kwargs", "noise",
                                             "noise_seed", "eval_each_epoch", "example_tied_dropout"}
    if unknown:
        raise ValueError(f"Unknown config field(s) {sorted(unknown)}; the recipe fields are {sorted(_RECIPE_FIELDS)}.")
    n_train = int((data.split == "train").sum())
    d = {"dataset": "custom", "model": "custom", "noise": float((data.group == "noisy").sum() / max(n_train, 1)),
         "stop_at_train_acc": None}
    if epochs is not None:
        d["epochs"] = max(1, int(epochs))
    d.update({k: v for k, v in given.items() if k in _RECIPE_FIELDS})
    return TrainConfig.from_dict(d).validate(), "given" if config is not None else "default"


class Recorder:
    """Record a run from your own training loop (see the module docstring).

    Args:
        out: the run folder to create (an existing non-empty folder is refused unless ``overwrite=True``).
        model: your model, *before* training: its current weights are saved as epoch 0 (the initialisation that
            rewinding and retraining go back to). Also how memloc rebuilds it: pass ``factory=`` (a zero-argument
            callable or ``"package.module:name"``) if deep copies of this instance are not what you want.
        data: the :class:`~memloc.data.Dataset` you train on (``memloc.from_arrays``/``from_torch``); ``batch``
            takes its example ids.
        config: your recipe (TrainConfig fields), recorded for methods that retrain.
        eval_batch_size: batch size of the evaluation passes.
    Methods: :meth:`batch` before each optimiser step, :meth:`epoch_end` after each epoch, :meth:`finish` at the
    end (returns the :class:`~memloc.train.Run`). Usable as a context manager (``finish`` on a clean exit).
    """

    def __init__(self, out: str | Path, model: nn.Module, data: Dataset, config: Any = None, *, factory: Any = None,
                 eval_batch_size: int = 1024, overwrite: bool = False, progress: bool = False):
        from .hooks import model_device
        from .models.factory import as_factory

        if not isinstance(model, nn.Module):
            raise TypeError(f"Recorder needs your nn.Module (before training); got {type(model).__name__}.")
        if not isinstance(data, Dataset):
            raise TypeError("Recorder needs a memloc Dataset (memloc.from_arrays / memloc.data.from_torch); got "
                            f"{type(data).__name__}.")
        self.out, self.data = Path(out), data
        self.cfg, recipe = _user_config(config, data, None)
        self.cfg.eval_batch_size = eval_batch_size
        self._epochs_given = config is not None and "epochs" in (config.to_dict() if isinstance(config, TrainConfig)
                                                                 else config)
        self.factory = as_factory(model if factory is None else factory)
        self.examples = data.examples()
        self._train_ids = set(data.example_id[torch.as_tensor(data.split == "train")].tolist())
        self._pos = pd.Series(np.arange(len(data)), index=data.example_id.numpy())
        self.epoch, self.history, self.seconds = 0, [], 0.0
        self._rows: list[pd.DataFrame] = []
        self._t0 = time.perf_counter()
        self._finished = False
        self.device = model_device(model)
        _claim_folder(self.out, overwrite)
        self._info = _run_info(self.cfg, data, self.factory, model, recipe=recipe, source="Recorder")
        _write_run_start(self.out, self._info, data, custom_data=True)
        self._save_epoch(model)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._finished:
            self.finish()

    def batch(self, example_ids, logits: torch.Tensor, labels=None) -> None:
        """Record one minibatch *before* the optimiser step: ``example_ids [B]`` (ids of ``data``), the
        ``logits [B, K]`` the step is computed from, and optionally the ``labels [B]`` you trained on (checked
        against the data's training labels: a mismatch means the ids are not the ones of these examples)."""
        if self._finished:
            raise RuntimeError("This Recorder is finished; create a new one for another run.")
        ids = torch.as_tensor(np.asarray(example_ids.detach().cpu() if isinstance(example_ids, torch.Tensor)
                                         else example_ids), dtype=torch.long).reshape(-1)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or len(logits) != len(ids):
            raise ValueError(f"batch() needs logits [B, K] for B={len(ids)} example ids; got "
                             f"{list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}.")
        if logits.shape[1] != self.data.num_classes:
            raise ValueError(f"The logits have {logits.shape[1]} classes but the data has {self.data.num_classes}.")
        bad = [i for i in ids.tolist() if i not in self._train_ids]
        if bad:
            raise UnknownKeyError(f"Example id(s) {bad[:10]} are not training examples of this data (training ids: "
                           f"{len(self._train_ids)}, e.g. {sorted(self._train_ids)[:5]}).")
        pos = torch.as_tensor(self._pos.loc[ids.numpy()].to_numpy(copy=True))
        y = self.data.y[pos]
        if labels is not None:
            lab = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
            if len(lab) != len(ids) or not torch.equal(lab, y):
                raise ValueError("The labels given to batch() differ from the data's training labels for these ids "
                                 f"(first differences at positions {torch.nonzero(lab != y).flatten()[:5].tolist() if len(lab) == len(ids) else 'all'}): "
                                 "the example ids do not match the examples in the batch.")
        stats = _per_example(logits.detach().float().cpu(), y)
        df = _frame(ids, stats)
        df.insert(1, "epoch", self.epoch + 1)
        df.insert(2, "source", "minibatch")
        self._rows.append(df)

    def epoch_end(self, model: nn.Module) -> dict[str, float]:
        """Close the epoch: save a checkpoint, evaluate every example (eval mode; the model's train/eval modes
        are restored afterwards) and write the epoch's records. Returns the group accuracies."""
        if self._finished:
            raise RuntimeError("This Recorder is finished; create a new one for another run.")
        self.epoch += 1
        return self._save_epoch(model)

    def _save_epoch(self, model: nn.Module) -> dict[str, float]:
        modes = [m.training for m in model.modules()]
        t0 = time.perf_counter()
        try:
            df, acc = _eval_rows(model, self.data, self.examples, self.epoch, self.cfg.eval_batch_size)
        finally:
            for m, t in zip(model.modules(), modes):
                m.training = t
        mb = pd.concat(self._rows, ignore_index=True) if self._rows else None
        if mb is not None:
            dup = mb.example_id.duplicated()
            if dup.any():
                raise ValueError(f"Example id(s) {mb.example_id[dup].unique()[:5].tolist()} were recorded more than "
                                 f"once in epoch {self.epoch}; call epoch_end() after each pass over the data.")
            mb = mb.sort_values("example_id", ignore_index=True)
        parts = [p for p in (mb, df) if p is not None]
        save_result(make_result(pd.concat(parts, ignore_index=True), epoch=self.epoch),
                    self.out / "dynamics" / f"epoch_{self.epoch:03d}.parquet")
        save_checkpoint(model, self.out / "checkpoints" / _ckpt_name(self.epoch), epoch=self.epoch)
        self._rows = []
        self.history.append({"epoch": self.epoch, **acc})
        self.seconds += time.perf_counter() - t0
        return acc

    def finish(self) -> Run:
        """Write ``dynamics.parquet`` and ``summary.json``; returns the run (holding the model factory)."""
        if self._finished:
            return Run(self.out, model=self.factory, device=self.device)
        if self._rows:
            raise RuntimeError(f"{sum(len(r) for r in self._rows)} minibatch records were given after the last "
                               "epoch_end(); call epoch_end(model) to close the epoch first.")
        if self.epoch == 0:
            raise RuntimeError("No epoch was recorded; call epoch_end(model) after each epoch of training.")
        if not self._epochs_given:  # the recipe's epoch count is the number of epochs recorded
            self.cfg.epochs = self.epoch
            self._info["train"] = self.cfg.to_dict()
            write_json(self._info, self.out / "config.json")
        model = Run(self.out, model=self.factory, device=self.device).model()
        _finalize(self.out, self.cfg, self.data, self.examples, model, self.history,
                  time.perf_counter() - self._t0, device=str(self.device), source="Recorder")
        self._finished = True
        return Run(self.out, model=self.factory, device=self.device)


# ----------------------------------------------------------------------------------------------- checkpoint files

_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


def load_state_file(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file (``torch.load(weights_only=True)``: no pickled
    code is ever run). A torch file holding a dict with the state dict under ``key`` (or under one of
    ``state_dict``, ``model_state_dict``, ``model``, ``net``, ``weights``: the usual training-loop checkpoint
    with the optimiser beside it) is unpacked."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    if path.suffix == ".safetensors":
        return load_checkpoint(path)
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"{path} cannot be read as a weights-only torch file ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}). Save state dicts (model.state_dict()), not whole models; "
                         "memloc never unpickles code.") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
    if key is not None:
        if key not in obj:
            raise ValueError(f"{path} has no entry {key!r}; its entries are {list(obj)[:10]}.")
        obj = obj[key]
    elif not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = [k for k in _STATE_KEYS if isinstance(obj.get(k), Mapping)]
        if not found:
            raise ValueError(f"{path} is a dict whose entries {list(obj)[:10]} are not all tensors, and none of "
                             f"{list(_STATE_KEYS)} holds a state dict; pass key= to say which entry does.")
        obj = obj[found[0]]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries {bad[:5]} of the state dict are not tensors.")
    return dict(obj)


def _find_checkpoints(checkpoints: Any, pattern: str | None) -> dict[int, Any]:
    """``{epoch: state dict or path}`` from a mapping or a folder (epoch = the number in the file name)."""
    if isinstance(checkpoints, Mapping):
        out = {}
        for e, v in checkpoints.items():
            if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 0:
                raise ValueError(f"Checkpoint epochs must be non-negative ints; got {e!r}.")
            out[int(e)] = v
        return out
    folder = Path(checkpoints)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of checkpoints (nor was a {{epoch: state_dict}} mapping "
                                "given).")
    if pattern is not None:
        if pattern.count("{epoch}") != 1:
            raise ValueError(f"pattern must contain '{{epoch}}' once, e.g. 'epoch_{{epoch}}.pt'. Got {pattern!r}.")
        rx = re.compile("^" + re.escape(pattern).replace(re.escape("{epoch}"), r"(\d+)") + "$")
    else:
        rx = re.compile(r"^(?:.*?)(\d+)\D*\.(?:pt|pth|bin|ckpt|safetensors)$")
    out = {}
    for p in sorted(folder.iterdir()):
        m = rx.match(p.name)
        if m and p.is_file():
            e = int(m.group(1))
            if e in out:
                raise ValueError(f"Two files in {folder} give epoch {e}: {Path(out[e]).name} and {p.name}; pass "
                                 "pattern= (e.g. 'epoch_{epoch}.pt') to say which files are checkpoints.")
            out[e] = p
    if not out:
        raise FileNotFoundError(f"No checkpoint files in {folder} (looked for "
                                f"{pattern or 'names with an epoch number ending in .pt/.pth/.bin/.ckpt/.safetensors'}).")
    return out


def from_checkpoints(model: Any, checkpoints: Any, data: Dataset, out: str | Path, *, config: Any = None,
                     pattern: str | None = None, key: str | None = None, device: str | torch.device = "cpu",
                     eval_batch_size: int = 1024, overwrite: bool = False, progress: bool = True) -> Run:
    """Adapt your own checkpoints into a run folder; returns the :class:`~memloc.train.Run`.

    Args:
        model: your model: a zero-argument factory (e.g. the class), an importable ``"package.module:name"``
            (recorded, so the folder can be reopened without it, also from the command line) or an instance.
        checkpoints: ``{epoch: state_dict or file}``, or a folder of files whose names carry the epoch
            (``epoch_3.pt``, ``ckpt-0003.safetensors``; or say how with ``pattern="model_{epoch}.pt"``). Epoch 0
            should be the initialisation (rewinding and retraining go back to it; without it retraining resets a
            layer to a fresh seeded initialisation and says so). Files: safetensors, or torch files read with
            ``weights_only=True`` (a dict with the state dict under ``key`` / a usual name is unpacked).
        data: the :class:`~memloc.data.Dataset` the model was trained on (your flipped labels in ``y``, the
            true ones in ``original_label``).
        config: your recipe (TrainConfig fields); methods that retrain use it (memloc's default otherwise, with a
            warning).
        device: where the evaluation passes run and where the returned run puts its models.
    Every checkpoint is checked against the model (missing / unexpected keys and shapes are named), copied into
    ``out/checkpoints`` as safetensors, and evaluated on every example: the run's dynamics are these
    ``source="eval"`` rows (per-example loss, correctness, margin at each checkpoint), so dynamics scores,
    curvature, rewinding and the rest work as on a run memloc trained.
    """
    from tqdm.auto import tqdm

    from .hooks import resolve_device
    from .models.factory import as_factory, load_state

    if not isinstance(data, Dataset):
        raise TypeError("data must be a memloc Dataset (memloc.from_arrays / memloc.data.from_torch); got "
                        f"{type(data).__name__}.")
    dev = resolve_device(device)
    found = _find_checkpoints(checkpoints, pattern)
    epochs = sorted(found)
    cfg, recipe = _user_config(config, data, epochs[-1])
    cfg.eval_batch_size = eval_batch_size
    factory = as_factory(model)
    out = Path(out)
    net = factory.architecture()
    states = {}
    for e in epochs:  # every file is read and checked before anything is written
        st = found[e] if isinstance(found[e], Mapping) else load_state_file(found[e], key)
        load_state(net, st, what=f"The checkpoint of epoch {e}" + ("" if isinstance(found[e], Mapping)
                                                                    else f" ({found[e]})"))
        states[e] = {k: v.detach().cpu() for k, v in st.items()}
    _check_forward(net, data)
    net = net.to(dev)
    _claim_folder(out, overwrite)
    _write_run_start(out, _run_info(cfg, data, factory, net, recipe=recipe, source="from_checkpoints",
                                    checkpoint_source=str(checkpoints) if not isinstance(checkpoints, Mapping)
                                    else "mapping"), data, custom_data=True)
    examples = data.examples()
    history = []
    t0 = time.perf_counter()
    for e in tqdm(epochs, desc="evaluate checkpoints", disable=not progress, leave=False):
        load_state(net, states[e])
        df, acc = _eval_rows(net, data, examples, e, eval_batch_size)
        save_result(make_result(df, epoch=e), out / "dynamics" / f"epoch_{e:03d}.parquet")
        save_checkpoint(states[e], out / "checkpoints" / _ckpt_name(e), epoch=e)
        history.append({"epoch": e, **acc})
    _finalize(out, cfg, data, examples, net, history, time.perf_counter() - t0, device=str(dev),
              source="from_checkpoints")
    return Run(out, model=factory, device=dev)
