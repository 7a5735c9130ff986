"""Layer retraining with real freezing (Maini et al. 2023, sec. 1c of the reference notes).

One layer is reset to its initialisation, every other parameter is frozen (``requires_grad`` off on the
model's real parameters, only the layer's parameters in the optimiser, the other modules in eval mode so their
BatchNorm statistics stay too), and the model is trained on *clean* examples only. If noisy-example accuracy
(against the flipped labels) comes back, the memorization lived elsewhere; if it stays near chance, the reset
layer was critical. The reference code froze nothing (it set ``requires_grad`` on ``state_dict()`` copies) and
trained on the noisy set by a doubled mask inversion; memloc checks after every layer that all frozen
parameters and buffers are bit-identical to the final model's.
"""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..results import make_result
from ..train import Run
from ._common import frame, group_accuracies, layer_keys, long_accuracy_rows, resolve_layers, seeded_generator


def retrain_layers(run: Run, layers: str | Sequence[str] | None = None, max_epochs: int = 20, patience: int = 3,
                   optimizer: str | None = None, lr: float | None = None, batch_size: int | None = None,
                   seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Reset each layer to initialisation, freeze the rest, retrain on clean examples; accuracy per epoch.

    Args:
        layers: module paths (default: ``layer_names(model, head=True)``, the head included as in Maini et al.).
        max_epochs: at most this many epochs per layer; training stops earlier after ``patience`` consecutive
            epochs at 100% clean accuracy.
        optimizer, lr, batch_size: default to the run's own (constant learning rate).
        seed: data order.
    Returns a result with rows ``layer, epoch, group, accuracy, n`` (epoch 0 = just after the reset) and
    settings including ``frozen_max_change`` (0.0: nothing else moved).
    """
    if not isinstance(max_epochs, int) or max_epochs < 1:
        raise ValueError(f"The 'max_epochs' parameter must be an int in [1, inf). Got {max_epochs!r} instead.")
    cfg = run.config
    run.warn_default_recipe("layer retraining")
    optimizer = optimizer or cfg.optimizer
    lr = lr or cfg.lr
    batch_size = batch_size or cfg.batch_size
    data = run.data()
    final_state = run.checkpoint()
    init, reset_to = _initial_state(run)
    layers = resolve_layers(run.model(), layers, head=True)
    rows: list[dict] = []
    for layer in tqdm(layers, desc="retrain", disable=not progress, leave=False):
        layer_rows, _ = retrain_layer(run, layer, max_epochs=max_epochs, patience=patience, optimizer=optimizer,
                                      lr=lr, batch_size=batch_size, seed=seed, _data=data, _init=init,
                                      _final=final_state)
        rows += layer_rows
    frozen_change = 0.0  # retrain_layer raises if anything frozen moved
    return make_result(frame(rows), method="retrain", run=str(run.path), layers=layers, max_epochs=max_epochs,
                       patience=patience, optimizer=optimizer, lr=lr, batch_size=batch_size, seed=seed,
                       trained_on="clean", frozen_max_change=frozen_change, reset_to=reset_to,
                       model=run.model_name, config=cfg.to_dict())


def _initial_state(run: Run) -> tuple[dict, str]:
    """The weights a layer is reset to: the run's epoch-0 checkpoint, or (for adapted checkpoints without one)
    a fresh initialisation of the run's own model from its seed."""
    if 0 in run.epochs:
        return run.checkpoint(0), "epoch 0 (the run's initialisation)"
    state = {k: v.detach().cpu() for k, v in run.new_model(device="cpu").state_dict().items()}
    return state, f"a fresh initialisation of the run's model (seed {run.config.seed}; the run has no epoch-0 checkpoint)"


def retrain_layer(run: Run, layer: str, max_epochs: int = 20, patience: int = 3, optimizer: str | None = None,
                  lr: float | None = None, batch_size: int | None = None, seed: int = 0, _data=None, _init=None,
                  _final=None):
    """Retrain one layer (see :func:`retrain_layers`); returns ``(rows, model)`` with the retrained model in
    eval mode. Raises if any parameter or buffer outside the layer differs from the final model's afterwards."""
    cfg = run.config
    optimizer, lr, batch_size = optimizer or cfg.optimizer, lr or cfg.lr, batch_size or cfg.batch_size
    if optimizer not in ("sgd", "adam", "adamw"):
        raise ValueError(f"The 'optimizer' parameter must be one of ['sgd', 'adam', 'adamw']. Got {optimizer!r} instead.")
    data = run.data() if _data is None else _data
    init = _initial_state(run)[0] if _init is None else _init
    final = run.checkpoint() if _final is None else _final
    clean = data.subset(data.group == "clean")
    model = run.model()
    dev = next(iter(model.parameters())).device
    cx, cy = clean.x.to(dev), clean.y.to(dev)
    keys = layer_keys(model, layer, buffers=True)
    with torch.no_grad():
        sd = dict(model.state_dict(keep_vars=True))
        for k in keys:
            sd[k].copy_(init[k])
    params = [p for k, p in model.named_parameters() if k in keys]
    for k, p in model.named_parameters():
        p.requires_grad_(k in keys)
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=lr, momentum=cfg.momentum),
           "adam": lambda: torch.optim.Adam(params, lr=lr),
           "adamw": lambda: torch.optim.AdamW(params, lr=lr)}[optimizer]()
    target = dict(model.named_modules())[layer]
    rows = long_accuracy_rows(group_accuracies(model.eval(), data), data, layer=layer, epoch=0)
    streak = 0
    for epoch in range(1, max_epochs + 1):
        model.eval()
        target.train()  # only the reset layer updates its own normalisation statistics
        order = torch.randperm(len(clean), generator=seeded_generator(seed, epoch))
        for b in range(math.ceil(len(clean) / batch_size)):
            idx = order[b * batch_size:(b + 1) * batch_size].to(dev)
            loss = F.cross_entropy(model(cx[idx]), cy[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        acc = group_accuracies(model, data)
        rows += long_accuracy_rows(acc, data, layer=layer, epoch=epoch)
        streak = streak + 1 if acc["clean"] >= 1.0 else 0
        if streak >= patience:
            break
    after = model.state_dict()
    moved = [k for k in after if k not in keys and not torch.equal(after[k].cpu(), final[k])]
    if moved:
        raise RuntimeError(f"Retraining {layer!r} changed frozen tensors {moved[:5]}; this is a bug.")
    for p in model.parameters():
        p.requires_grad_(True)
    return rows, model
