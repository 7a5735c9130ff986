"""Models of the memorization literature with stable layer names.

Every model keeps its computation in ``model.layers`` (an ``nn.Sequential``), so module paths are stable:
``layers.0`` is the first block, its output (after the non-linearity) holds that block's *neurons*: features for
linear blocks, channels for convolutional ones. ``model.layer_names`` lists the parametrised layers in order
(the groups that rewinding and retraining act on, e.g. the 9 groups of Maini et al.'s ResNet-9).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["MLP", "CNN1d", "CNN2d", "ResNet9", "MODELS", "build_model", "check_model_kwargs", "layer_names"]


class LinearBlock(nn.Module):
    """Linear -> ReLU. Output ``[B, out_features]``: neurons are output features."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


class ConvBlock(nn.Module):
    """Conv (1-D or 2-D) -> optional BatchNorm -> ReLU. Output ``[B, C, ...]``: neurons are channels."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, padding: int | None = None,
                 dims: int = 2, batch_norm: bool = True):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        pad = kernel_size // 2 if padding is None else padding
        self.conv = conv(c_in, c_out, kernel_size, stride=stride, padding=pad, bias=not batch_norm)
        self.bn = bn(c_out) if batch_norm else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    """``x + block(x)`` (no activation after the sum, as in the FFCV/Maini ResNet-9)."""

    def __init__(self, *blocks: nn.Module):
        super().__init__()
        self.block = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class _Sequential(nn.Module):
    layer_names: list[str]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, *input_shape]`` -> logits ``[B, num_classes]``."""
        return self.layers(x)


class MLP(_Sequential):
    """Fully connected ReLU network, e.g. 40-256-256-10 (MNIST-1D) or 64-256-256-10 (digits).

    Inputs of any shape ``[B, ...]`` are flattened. Blocks ``layers.0 .. layers.{L-1}`` are Linear+ReLU
    (neurons: their output features); ``layers.L`` is the linear head.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        d = 1
        for s in input_shape:
            d *= int(s)
        mods: list[nn.Module] = []
        for h in hidden:
            mods.append(LinearBlock(d, int(h)))
            d = int(h)
        mods.append(nn.Linear(d, num_classes))
        self.layers = nn.Sequential(*mods)
        self._flatten = nn.Flatten()
        self.layer_names = [f"layers.{i}" for i in range(len(mods))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self._flatten(x))


class CNN1d(_Sequential):
    """Small 1-D CNN for MNIST-1D (Greydanus 2020's ConvBase: three stride-2 convs, then a linear head; here
    64 channels with BatchNorm by default, which fits 10% flipped labels in ~30 epochs at ~86% test accuracy).

    Accepts ``[B, L]`` or ``[B, 1, L]``. Blocks ``layers.0..2`` are Conv1d(+BN)+ReLU (neurons: channels);
    ``layers.3`` flattens, ``layers.4`` is the head.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (64, 64, 64),
                 batch_norm: bool = True):
        super().__init__()
        shape = tuple(input_shape)
        if len(shape) == 1:
            c, length = 1, shape[0]
        elif len(shape) == 2:
            c, length = shape
        else:
            raise ValueError(f"CNN1d expects inputs [B, L] or [B, C, L]; got examples of shape {list(shape)}.")
        self._unsqueeze = len(shape) == 1
        mods: list[nn.Module] = []
        for i, ch in enumerate(channels):
            k = 5 if i == 0 else 3
            mods.append(ConvBlock(c, int(ch), kernel_size=k, stride=2, padding=1, dims=1, batch_norm=batch_norm))
            c = int(ch)
            length = (length + 2 - k) // 2 + 1
        mods += [nn.Flatten(), nn.Linear(c * length, num_classes)]
        self.layers = nn.Sequential(*mods)
        n = len(channels)
        self.layer_names = [f"layers.{i}" for i in range(n)] + [f"layers.{n + 1}"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.unsqueeze(1) if self._unsqueeze else x)


class CNN2d(_Sequential):
    """Small image CNN: Conv-BN-ReLU-MaxPool blocks, global average pooling, linear head.

    Input ``[B, C, H, W]``. Blocks ``layers.0..n-1`` (neurons: channels), ``layers.n`` pools and flattens,
    ``layers.{n+1}`` is the head. Pooling stops once the feature map is 1x1, so 8x8 digits work as well as
    32x32 CIFAR-10.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64, 128),
                 batch_norm: bool = True):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"CNN2d expects inputs [B, C, H, W]; got examples of shape {list(input_shape)}.")
        c, h, _ = input_shape
        mods: list[nn.Module] = []
        for ch in channels:
            block = [ConvBlock(c, int(ch), dims=2, batch_norm=batch_norm)]
            if h >= 2:
                block.append(nn.MaxPool2d(2))
                h //= 2
            mods.append(nn.Sequential(*block))
            c = int(ch)
        mods += [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(c, num_classes)]
        self.layers = nn.Sequential(*mods)
        n = len(channels)
        self.layer_names = [f"layers.{i}" for i in range(n)] + [f"layers.{n + 1}"]


class ResNet9(_Sequential):
    """ResNet-9 of the localization literature (FFCV's ``rn9``, used by Maini et al. 2023).

    8 conv-BN-ReLU blocks with two residual blocks, max-pooling, a bias-free linear head and a x0.2 output
    scale. ``width`` multiplies every channel count (1.0 = 64-128-256). Input ``[B, 3, 32, 32]`` (any size
    >= 8). ``layer_names`` are Maini et al.'s 9 layer groups: ``layers.0`` (conv 3->64), ``layers.1`` (conv
    5x5 stride 2), ``layers.2.block.0`` / ``layers.2.block.1`` (residual block 1), ``layers.3`` (conv before the
    max-pool), ``layers.5.block.0`` / ``layers.5.block.1`` (residual block 2), ``layers.6`` and ``layers.8`` (fc).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: float = 1.0):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ResNet9 expects inputs [B, C, H, W]; got examples of shape {list(input_shape)}.")
        c0 = input_shape[0]
        w1, w2, w3 = (max(1, int(round(c * width))) for c in (64, 128, 256))
        self.layers = nn.Sequential(
            ConvBlock(c0, w1, 3),                                  # 0
            ConvBlock(w1, w2, 5, stride=2, padding=2),             # 1
            Residual(ConvBlock(w2, w2), ConvBlock(w2, w2)),        # 2
            ConvBlock(w2, w3, 3),                                  # 3
            nn.MaxPool2d(2),                                       # 4
            Residual(ConvBlock(w3, w3), ConvBlock(w3, w3)),        # 5
            ConvBlock(w3, w2, 3, padding=0),                       # 6
            nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten()),  # 7
            nn.Linear(w2, num_classes, bias=False),                # 8
            Scale(0.2),                                            # 9
        )
        self.layer_names = ["layers.0", "layers.1", "layers.2.block.0", "layers.2.block.1", "layers.3",
                            "layers.5.block.0", "layers.5.block.1", "layers.6", "layers.8"]


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "cnn1d": CNN1d, "cnn2d": CNN2d, "resnet9": ResNet9}


def check_model_kwargs(name: str, kwargs: Any, what: str = "model_kwargs") -> None:
    """Refuse keyword arguments of the registered model ``name`` that it does not take, or whose values cannot
    build it (``hidden`` / ``channels``: lists of ints >= 1; ``width`` > 0; ``batch_norm`` a bool)."""
    from ..validate import ConfigError, call_keywords, number, positive_ints

    if not isinstance(kwargs, dict):
        raise ConfigError(f"The {what!r} parameter must be a dict of keyword arguments. Got {kwargs!r} instead.")
    call_keywords(what, MODELS[name], kwargs, skip=("input_shape", "num_classes"), what=f"model {name!r}")
    for key in ("hidden", "channels"):
        if key in kwargs:
            positive_ints(f"{what}.{key}", kwargs[key], allow_empty=key == "hidden")
    if "width" in kwargs:
        number(f"{what}.width", kwargs["width"], lo=0, lo_open=True)
    if "batch_norm" in kwargs and not isinstance(kwargs["batch_norm"], bool):
        raise ConfigError(f"The '{what}.batch_norm' parameter must be true or false. Got {kwargs['batch_norm']!r} "
                          "instead.")


def build_model(name: str, input_shape: Sequence[int], num_classes: int, seed: int | None = None,
                **kwargs: Any) -> nn.Module:
    """Build a registered model (``mlp``, ``cnn1d``, ``cnn2d``, ``resnet9``).

    ``seed`` initialises the weights reproducibly without touching the caller's global RNG (the global state
    is forked and restored). Extra keyword arguments go to the model class (``hidden=``, ``channels=``,
    ``width=``, ``batch_norm=``).
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; valid models are {sorted(MODELS)} (or pass any nn.Module).")
    check_model_kwargs(name, kwargs)
    if seed is None:
        return MODELS[name](tuple(input_shape), int(num_classes), **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](tuple(input_shape), int(num_classes), **kwargs)


def layer_names(model: nn.Module, head: bool = False) -> list[str]:
    """The layers a researcher would pick, in forward order; the head (the layer producing the logits) only
    with ``head=True``.

    The rule, for any ``nn.Module``:

    1. ``model.layer_names`` when the model defines it (memloc's models do; set it on your own model to choose
       the layers yourself): its last entry is the head.
    2. Otherwise the blocks of the outermost container: starting at the model, while exactly one child owns
       parameters (directly or below), descend into that child; the children of the module reached that own
       parameters are the layers, in registration order (normally the forward order). A residual block is one
       layer; activations, pooling and other parameter-free modules are not layers. The last of them is the head.

    Every method that takes ``layers=`` uses this rule for its default and says whether it adds the head:
    rewinding, retraining and the probes include it (Maini et al.'s layer groups include the classifier),
    greedy ablation, unlearning and example-tied dropout do not (zeroing a logit flips any example and
    locates nothing).
    """
    names = getattr(model, "layer_names", None)
    if names is not None:
        names = list(names)
    else:
        def owns(m: nn.Module) -> bool:
            return any(True for _ in m.parameters())

        prefix, mod = "", model
        while True:
            kids = [(n, c) for n, c in mod.named_children() if owns(c)]
            if len(kids) == 1 and any(True for _ in kids[0][1].children()):
                prefix, mod = prefix + kids[0][0] + ".", kids[0][1]
                continue
            break
        if not kids and any(True for _ in mod.parameters(recurse=False)):
            names = [prefix[:-1]] if prefix else []
        else:
            names = [prefix + n for n, _ in kids]
        if not names:
            raise ValueError(f"{type(model).__name__} has no submodule with parameters to call a layer; give "
                             "layers= explicitly (module paths from model.named_modules()).")
    return names if head else names[:-1]
