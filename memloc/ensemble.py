"""Many small models trained at once, each on its own random subset of the training examples.

The ensemble behind Feldman-Zhang memorization and influence, the C-score and LiRA's shadow models. Models'
parameters and buffers are stacked along a leading dimension and trained with ``torch.func.vmap`` over
``functional_call``: one forward and one backward pass serve ``chunk`` models, each with its own minibatch from
its own subset in its own order. The loss is the *sum* of the models' mean losses, so each model's gradient is
exactly its own, and SGD/Adam/AdamW act elementwise, so one optimiser over the stacked tensors is the same as one
per model. BatchNorm works: each model has its own running statistics (its slice of the stacked buffers, updated
in place under ``vmap``) and normalises with its own minibatch's statistics, exactly as when trained alone.
``train_ensemble(..., method="loop")`` trains the same models one after another (the reference the batched path
is tested against, and the fall-back for a model that cannot be stacked, announced with a warning).

**Whose model.** ``train_ensemble(run, ...)`` trains the run's *own* architecture (its model factory: your model
class for a run of your model) with the run's recipe (optimiser, learning rate, momentum, weight decay, batch
size, schedule, and as many epochs as the run trained), on the run's device. With a Dataset, ``model=`` says
what to train (a registered name, a factory or a module; default a 256-unit MLP).

**Fit check.** Feldman-Zhang memorization and LiRA assume models that fit their own training subsets. The
ensemble records how well they do (``settings["fit_own_subset"]``, and for the flipped labels
``fit_own_subset_noisy``) and warns when the models fit less than 95% of their subsets (90% of the flipped
examples in them): such scores say little.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import Dataset

__all__ = ["Ensemble", "train_ensemble", "subset_masks"]

FIT_WARN = 0.95
FIT_WARN_NOISY = 0.90


def subset_masks(n_models: int, n_train: int, ratio: float, seed: int = 0, balanced: bool = False) -> np.ndarray:
    """``[n_models, n_train]`` bool: which training examples each model trains on.

    Each model gets ``floor(ratio * n_train)`` examples drawn without replacement (Feldman & Zhang). With
    ``balanced`` (LiRA's scheme, ratio 0.5), every example is in exactly ``round(ratio * n_models)`` models, so
    subset sizes vary around ``ratio * n_train``; the batched path then gives every model as many steps per
    epoch as the largest subset needs, wrapping each model's own shuffled subset (see :func:`_orders`).
    """
    if not isinstance(n_models, int) or n_models < 1:
        raise ValueError(f"The 'n_models' parameter must be an int in [1, inf). Got {n_models!r} instead.")
    if not 0 < ratio < 1:
        raise ValueError(f"The 'ratio' parameter must be in (0, 1). Got {ratio!r} instead.")
    rng = np.random.default_rng(seed)
    if balanced:
        keep = np.argsort(rng.random((n_models, n_train)), axis=0) < round(ratio * n_models)
        return keep
    k = int(math.floor(ratio * n_train))
    masks = np.zeros((n_models, n_train), dtype=bool)
    for m in range(n_models):
        masks[m, rng.choice(n_train, k, replace=False)] = True
    return masks


@dataclass
class Ensemble:
    """Trained ensemble: which examples each model saw and what it predicts on every example.

    Attributes:
        masks: ``[M, n_train]`` bool, training membership (train examples in ``train_ids`` order).
        train_ids, test_ids: example ids of the columns.
        correct_train, correct_test: ``[M, n_train]`` / ``[M, n_test]`` bool, prediction == training label.
        phi_train, phi_test: ``[M, n]`` float32 LiRA statistic ``log p_y - log sum_{y' != y} p_y'``.
        settings: what produced it.
    """

    masks: np.ndarray
    train_ids: np.ndarray
    test_ids: np.ndarray
    correct_train: np.ndarray
    correct_test: np.ndarray
    phi_train: np.ndarray
    phi_test: np.ndarray
    settings: dict = field(default_factory=dict)

    @property
    def n_models(self) -> int:
        return len(self.masks)

    def save(self, path: str | Path) -> Path:
        """Atomically write the ensemble's arrays (safetensors) with its settings."""
        import json

        from safetensors.numpy import save_file

        from .results import atomic_path

        arrays = {k: np.ascontiguousarray(getattr(self, k)) for k in
                  ("train_ids", "test_ids", "phi_train", "phi_test")}
        arrays.update({k: np.ascontiguousarray(getattr(self, k)).astype(np.uint8) for k in
                       ("masks", "correct_train", "correct_test")})
        with atomic_path(path) as tmp:
            save_file(arrays, str(tmp), metadata={"settings": json.dumps(self.settings)})
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Ensemble":
        import json

        from safetensors import safe_open
        from safetensors.numpy import load_file

        a = load_file(str(path))
        with safe_open(str(path), "np") as f:
            settings = json.loads(f.metadata()["settings"])
        return cls(masks=a["masks"].astype(bool), train_ids=a["train_ids"], test_ids=a["test_ids"],
                   correct_train=a["correct_train"].astype(bool), correct_test=a["correct_test"].astype(bool),
                   phi_train=a["phi_train"], phi_test=a["phi_test"], settings=settings)


def _phi(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LiRA's logit-scaled confidence ``log p_y - log(1 - p_y)``, computed stably. ``[..., K]``, ``[...]``."""
    logp = torch.log_softmax(logits.double(), -1)
    lp_y = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = logp.scatter(-1, y.unsqueeze(-1), float("-inf")).logsumexp(-1)
    return (lp_y - others).float()


def _make_opt(name: str, params, lr: float, momentum: float, weight_decay: float):
    # fused kernels: one pass over each stacked tensor (Adam's step was ~28% of ensemble time with foreach)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    raise ValueError(f"The 'optimizer' parameter must be 'sgd', 'adam' or 'adamw'. Got {name!r} instead.")


def _orders(masks: np.ndarray, seed: int, model_index: np.ndarray, epoch: int, k_max: int) -> torch.Tensor:
    """Per model, its subset's positions in this epoch's order: ``[M, k_max]`` (``k_max``: the largest subset of
    the whole ensemble). A model whose subset is smaller (balanced masks) continues with the start of its own
    order, so every model takes the same number of steps of the same size."""
    out = []
    for m, mi in enumerate(model_index):
        pos = torch.as_tensor(np.flatnonzero(masks[m]))
        g = torch.Generator().manual_seed((seed * 1_000_003 + int(mi)) * 1_009 + epoch)
        order = pos[torch.randperm(len(pos), generator=g)]
        if len(order) < k_max:
            order = order.repeat(math.ceil(k_max / len(order)))[:k_max]
        out.append(order)
    return torch.stack(out)


def _lr_at(cfg: dict, step: int, total: int, epoch: int) -> float:
    from .train import TrainConfig, _step_factor

    tc = TrainConfig(schedule=cfg["schedule"], warmup=cfg["warmup"], milestones=list(cfg["milestones"]),
                     gamma=cfg["gamma"], epochs=cfg["epochs"])
    return cfg["lr"] * _step_factor(tc, step, total, epoch)


def _new_models(factory, model_index, cfg: dict) -> list[nn.Module]:
    return [factory.new(cfg["seed"] * 100_003 + int(i)).to(device=cfg["device"], dtype=cfg["dtype"]).train()
            for i in model_index]


def _train_chunk(data: Dataset, masks: np.ndarray, model_index: np.ndarray, cfg: dict, factory,
                 progress_bar) -> list[dict]:
    """Train the models ``model_index`` (subsets ``masks``) together; return their final state_dicts."""
    from torch.func import functional_call, stack_module_state, vmap

    models = _new_models(factory, model_index, cfg)
    params, buffers = stack_module_state(models)
    base = models[0]
    opt = _make_opt(cfg["optimizer"], list(params.values()), cfg["lr"], cfg["momentum"], cfg["weight_decay"])

    def loss_one(p, b, x, y):
        return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

    batched_loss = vmap(loss_one, in_dims=(0, 0, 0, 0), randomness="different")
    x, y = _train_tensors(data, cfg)
    steps = math.ceil(cfg["k_max"] / cfg["batch_size"])
    for epoch in range(1, cfg["epochs"] + 1):
        order = _orders(masks, cfg["seed"], model_index, epoch, cfg["k_max"]).to(x.device)
        for s in range(steps):
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, (epoch - 1) * steps + s, steps * cfg["epochs"], epoch)
            idx = order[:, s * cfg["batch_size"]:(s + 1) * cfg["batch_size"]]
            loss = batched_loss(params, buffers, x[idx], y[idx]).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        progress_bar.update(len(model_index))
    return [{k: v[m].detach().cpu() for k, v in {**params, **buffers}.items()} for m in range(len(model_index))]


def _train_tensors(data: Dataset, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    train = data.train
    return train.x.to(device=cfg["device"], dtype=cfg["dtype"]), train.y.to(cfg["device"])


def _train_one(data: Dataset, mask: np.ndarray, model_index: int, cfg: dict, factory) -> dict:
    """The reference: one model, its own optimiser, the same subset, order and initialisation."""
    model = _new_models(factory, [model_index], cfg)[0]
    opt = _make_opt(cfg["optimizer"], list(model.parameters()), cfg["lr"], cfg["momentum"], cfg["weight_decay"])
    x, y = _train_tensors(data, cfg)
    steps = math.ceil(cfg["k_max"] / cfg["batch_size"])
    model.train()
    for epoch in range(1, cfg["epochs"] + 1):
        order = _orders(mask[None], cfg["seed"], np.array([model_index]), epoch, cfg["k_max"])[0].to(x.device)
        for s in range(steps):
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, (epoch - 1) * steps + s, steps * cfg["epochs"], epoch)
            idx = order[s * cfg["batch_size"]:(s + 1) * cfg["batch_size"]]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _stackable(data: Dataset, factory, cfg: dict) -> str | None:
    """``None`` if two models of this factory can be trained stacked (one vmapped step on a tiny batch); else
    the reason they cannot."""
    from torch.func import functional_call, stack_module_state, vmap

    try:
        models = _new_models(factory, [0, 1], cfg)
        params, buffers = stack_module_state(models)
        x, y = _train_tensors(data.subset(np.flatnonzero(data.split == "train")[:4]), cfg)
        out = vmap(lambda p, b, xx: functional_call(models[0], (p, b), (xx,)), in_dims=(0, 0, None),
                   randomness="different")(params, buffers, x)
        out.sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure means: train them one at a time
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def _recipe(source, model, epochs, optimizer, lr, momentum, weight_decay, batch_size, schedule):
    """The data, the model factory and the training recipe, from a run (its own) or from the arguments."""
    from .models.factory import as_factory
    from .train import Run, TrainConfig

    if isinstance(source, Run):
        run = source
        data = run.data()
        c = run.config
        run.warn_default_recipe("the ensemble")
        trained = (run.summary or {}).get("epochs") or c.epochs
        recipe = {"optimizer": c.optimizer, "lr": c.lr, "momentum": c.momentum, "weight_decay": c.weight_decay,
                  "batch_size": c.batch_size, "schedule": c.schedule, "warmup": c.warmup,
                  "milestones": list(c.milestones), "gamma": c.gamma, "epochs": int(trained)}
        factory = run.factory if model is None else as_factory(model, data.input_shape, data.num_classes)
        device = run.device
    elif isinstance(source, Dataset):
        data = source
        d = TrainConfig()
        recipe = {"optimizer": "adam", "lr": 3e-3, "momentum": d.momentum, "weight_decay": 0.0, "batch_size": 128,
                  "schedule": "constant", "warmup": d.warmup, "milestones": [], "gamma": d.gamma, "epochs": 30}
        factory = as_factory("mlp" if model is None else model, data.input_shape, data.num_classes)
        device = None
    else:
        raise TypeError(f"train_ensemble needs a Run or a Dataset; got {type(source).__name__}.")
    given = {"epochs": epochs, "optimizer": optimizer, "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
             "batch_size": batch_size, "schedule": schedule}
    recipe.update({k: v for k, v in given.items() if v is not None})
    if recipe["schedule"] not in ("constant", "cosine", "triangle", "step"):
        raise ValueError(f"The 'schedule' parameter must be one of ['constant', 'cosine', 'triangle', 'step']. "
                         f"Got {recipe['schedule']!r} instead.")
    for k in ("epochs", "batch_size"):
        if not isinstance(recipe[k], int) or recipe[k] < 1:
            raise ValueError(f"The {k!r} parameter must be an int in [1, inf). Got {recipe[k]!r} instead.")
    if not (isinstance(recipe["lr"], (int, float)) and math.isfinite(recipe["lr"]) and recipe["lr"] > 0):
        raise ValueError(f"The 'lr' parameter must be a finite number in (0, inf). Got {recipe['lr']!r} instead.")
    return data, factory, recipe, device


def train_ensemble(source, n_models: int = 64, ratio: float = 0.7, *, model: Any = None,
                   model_kwargs: dict | None = None, epochs: int | None = None, optimizer: str | None = None,
                   lr: float | None = None, momentum: float | None = None, weight_decay: float | None = None,
                   batch_size: int | None = None, schedule: str | None = None, seed: int = 0,
                   masks: np.ndarray | None = None, balanced: bool = False, chunk: int = 64, method: str = "batched",
                   dtype: torch.dtype | None = None, device: str | torch.device | None = None, progress: bool = True,
                   return_states: bool = False) -> Ensemble | tuple[Ensemble, list[dict]]:
    """Train ``n_models`` models, model m on the training examples ``masks[m]``, and record their predictions.

    Args:
        source: a :class:`~memloc.train.Run` (its own model, recipe and device: the default for scores of a
            run) or a :class:`~memloc.data.Dataset` (labels in ``data.y`` are the training labels, flipped ones
            included).
        n_models, ratio, balanced: subsets from :func:`subset_masks` (seeded by ``seed``) unless ``masks`` is given.
        model: what to train instead of the run's own model (a registered name, a zero-argument factory, an
            ``nn.Module`` or ``"package.module:name"``); with a Dataset the default is memloc's MLP (two hidden
            layers of 256). ``model_kwargs`` go to a registered name.
        epochs, optimizer (``sgd``/``adam``/``adamw``), lr, momentum, weight_decay, batch_size, schedule: override
            the recipe (a run's own; for a Dataset: Adam 3e-3, batch 128, 30 epochs, constant rate).
        seed: model m is initialised with seed ``seed * 100003 + m`` and shuffles its subset per epoch from
            ``(seed, m, epoch)``: results do not depend on ``chunk`` or ``method``.
        chunk: models trained together in one vmapped pass (memory knob).
        method: ``"batched"`` or ``"loop"`` (one model at a time; the reference). A model that cannot be stacked
            (``vmap`` fails on it) is trained in the loop, with a warning saying why.
        dtype: parameter dtype (default float32; ``torch.float64`` for exact comparisons).
        device: default the run's (CPU for a Dataset).
    Returns an :class:`Ensemble` (and the models' state_dicts, on the CPU, with ``return_states``).
    """
    from .hooks import resolve_device
    from .models.factory import as_factory

    if method not in ("batched", "loop"):
        raise ValueError(f"The 'method' parameter must be 'batched' or 'loop'. Got {method!r} instead.")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"The 'chunk' parameter must be an int in [1, inf). Got {chunk!r} instead.")
    if model_kwargs:
        if model is None and not isinstance(source, Dataset):
            raise ValueError("model_kwargs go with a registered model name (model='mlp', ...); a run's own model "
                             "takes none.")
        data0 = source if isinstance(source, Dataset) else source.data()
        model = as_factory("mlp" if model is None else model, data0.input_shape, data0.num_classes, **model_kwargs)
    data, factory, recipe, run_device = _recipe(source, model, epochs, optimizer, lr, momentum, weight_decay,
                                                batch_size, schedule)
    dev = resolve_device(device if device is not None else (run_device or "cpu"))
    train = data.train
    if masks is None:
        masks = subset_masks(n_models, len(train), ratio, seed, balanced)
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != len(train):
        raise ValueError(f"masks must be [n_models, n_train={len(train)}] booleans; got shape {list(masks.shape)}.")
    if (masks.sum(1) == 0).any():
        raise ValueError(f"Model(s) {np.flatnonzero(masks.sum(1) == 0)[:5].tolist()} have an empty training subset.")
    cfg = {**recipe, "model": factory.name, "factory": factory.spec, "seed": seed, "device": dev,
           "dtype": dtype or torch.get_default_dtype(), "k_max": int(masks.sum(1).max())}
    if method == "batched":
        why = _stackable(data, factory, cfg)
        if why is not None:
            warnings.warn(f"{factory.name} cannot be trained stacked ({why}); training the {len(masks)} models one "
                          "after another instead (same models, slower).", stacklevel=2)
            method = "loop (fallback)"
    M = len(masks)
    bar = tqdm(total=M * cfg["epochs"], desc=f"ensemble of {M}", unit="model-epoch", disable=not progress,
               leave=False)
    states: list[dict] = []
    step = chunk if method == "batched" else 1
    for s in range(0, M, step):
        idx = np.arange(s, min(M, s + step))
        if method == "batched":
            states += _train_chunk(data, masks[idx], idx, cfg, factory, bar)
        else:
            states.append(_train_one(data, masks[idx[0]], int(idx[0]), cfg, factory))
            bar.update(cfg["epochs"])
    bar.close()
    ens = _evaluate(data, states, masks, cfg, factory)
    fit, fit_noisy = _own_subset_fit(ens, data)
    settings = {k: v for k, v in cfg.items() if k not in ("device", "dtype")}
    ens.settings.update(settings, device=str(dev), dtype=str(cfg["dtype"]).replace("torch.", ""), n_models=M,
                        ratio=float(masks.sum(1).mean() / masks.shape[1]), balanced=balanced, method=method,
                        fit_own_subset=fit, fit_own_subset_noisy=fit_noisy)
    if fit < FIT_WARN or (fit_noisy is not None and fit_noisy < FIT_WARN_NOISY):
        warnings.warn(f"The ensemble's models fit only {fit:.1%} of their own training subsets"
                      + (f" ({fit_noisy:.1%} of the flipped examples in them)" if fit_noisy is not None else "")
                      + f" ({factory.name}, {cfg['optimizer']} lr={cfg['lr']}, {cfg['epochs']} epochs): Feldman-Zhang "
                      "memorization, C-scores and LiRA assume models that fit what they trained on, so these scores "
                      "will be weak. Train longer (epochs=), with a better learning rate, or a larger model.",
                      stacklevel=2)
    return (ens, states) if return_states else ens


def _own_subset_fit(ens: Ensemble, data: Dataset) -> tuple[float, float | None]:
    """Mean accuracy (against the training labels) of each model on its own subset, and on the flipped
    examples in it (``None`` without flipped labels)."""
    m, c = ens.masks, ens.correct_train
    fit = float((c & m).sum() / max(m.sum(), 1))
    noisy = data.by_ids(ens.train_ids).group == "noisy"
    if not noisy.any():
        return fit, None
    mn = m & noisy[None, :]
    return fit, float((c & mn).sum() / max(mn.sum(), 1))


def _evaluate(data: Dataset, states: list[dict], masks: np.ndarray, cfg: dict, factory) -> Ensemble:
    """Every model's predictions on every example (eval mode: each model's own BatchNorm statistics)."""
    from torch.func import functional_call

    base = factory.architecture().to(device=cfg["device"], dtype=cfg["dtype"]).eval()
    train, test = data.train, data.test
    out = {"correct_train": [], "correct_test": [], "phi_train": [], "phi_test": []}
    with torch.no_grad():
        for s in range(0, len(states), 64):
            stacked = {k: torch.stack([st[k] for st in states[s:s + 64]]).to(cfg["device"]) for k in states[0]}
            for part, d in (("train", train), ("test", test)):
                logits = []
                for b in range(0, len(d), 4096):
                    xb = d.x[b:b + 4096].to(device=cfg["device"], dtype=cfg["dtype"])
                    logits.append(torch.vmap(lambda p, x: functional_call(base, p, (x,)), in_dims=(0, None))(
                        stacked, xb).cpu())
                lg = torch.cat(logits, 1) if logits else torch.empty(len(stacked[next(iter(stacked))]), 0,
                                                                      data.num_classes)
                out[f"correct_{part}"].append((lg.argmax(-1) == d.y).numpy())
                out[f"phi_{part}"].append(_phi(lg, d.y.expand(len(lg), -1)).numpy())
    return Ensemble(masks=masks, train_ids=train.example_id.numpy(), test_ids=test.example_id.numpy(),
                    **{k: np.concatenate(v) for k, v in out.items()})
