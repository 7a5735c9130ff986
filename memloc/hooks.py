"""One way to name sites, capture activations and intervene.

A **site** is either a TransformerLens hook name (any model with a ``hook_dict``: ``HookedRootModule``
subclasses and ``TransformerBridge`` models, e.g. ``"blocks.3.mlp.hook_post"``) or a module path from
``model.named_modules()`` (any ``nn.Module``, e.g. ``"layers.2"``). Both are reached the same way: a PyTorch
forward hook on the resolved module, so capture and intervention share one mechanism, as TransformerLens'
``run_with_hooks`` does. A misspelt site is a :class:`SiteError` listing the closest valid names.

A **neuron** is ``(site, index)``: one feature or channel of the site's output. For module paths the neuron
axis is dim 1 (features of ``[B, F]``, channels of ``[B, C, ...]``); for hook names it is the last dim
(``[batch, pos, d_mlp]``). Pass ``dim=`` to override.

Every context manager here restores the model exactly on exit, exceptions included: hooks are removed and
replaced parameters are copied back bit for bit.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .validate import UnknownKeyError

__all__ = ["SiteError", "valid_sites", "resolve_site", "resolve_sites", "neuron_dim", "require_eval", "hooks",
           "scale_neurons", "ablate", "replace_parameters", "capture", "batched_forward", "model_device",
           "resolve_device", "copy_model"]


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device | None = "cpu") -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.

    Asking for CUDA on a machine without it is an error that says so (never a silent fall-back to the CPU).
    """
    if device is None:
        device = "cpu"
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) and (device in DEVICES or device.startswith("cuda:")):
        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(device)
    else:
        raise ValueError(f"The 'device' parameter must be one of {list(DEVICES)} or 'cuda:N'. Got {device!r} instead.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} was asked for, but this machine has no CUDA device "
                             "(torch.cuda.is_available() is False); use 'cpu' or 'auto'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r} does not exist; this machine has {torch.cuda.device_count()} "
                             "CUDA device(s).")
    elif dev.type != "cpu":
        raise ValueError(f"The 'device' parameter must be one of {list(DEVICES)} or 'cuda:N'. Got {device!r} instead.")
    return dev


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that also works when a module caches a tensor from a gradient-enabled forward pass
    (a ``TransformerBridge`` keeps each attention pattern as ``attn._pattern``; ``copy.deepcopy`` refuses such
    non-leaf tensors): those are copied detached."""
    import copy

    memo: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for v in vars(mod).values():
            if isinstance(v, torch.Tensor) and not v.is_leaf:
                memo[id(v)] = v.detach().clone()
    return copy.deepcopy(model, memo)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class SiteError(UnknownKeyError):
    """A site name that the model does not have. The message lists close matches and the valid names."""


def _hook_dict(model: nn.Module) -> Mapping[str, nn.Module]:
    hd = getattr(model, "hook_dict", None)
    return hd if isinstance(hd, Mapping) else {}


def valid_sites(model: nn.Module) -> list[str]:
    """All site names of ``model``: its hook names (if any) followed by its module paths."""
    hook_names = list(_hook_dict(model))
    seen = set(hook_names)
    return hook_names + [n for n, _ in model.named_modules() if n and n not in seen]


def resolve_site(model: nn.Module, name: str) -> nn.Module:
    """The module a site name refers to (a hook point or a submodule); :class:`SiteError` if there is none."""
    if not isinstance(name, str):
        raise TypeError(f"A site name must be a str (hook name or module path); got {type(name).__name__}.")
    hd = _hook_dict(model)
    if name in hd:
        return hd[name]
    mods = dict(model.named_modules())
    if name and name in mods:
        return mods[name]
    valid = valid_sites(model)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.6)
    shown = valid if len(valid) <= 40 else valid[:40] + [f"... ({len(valid) - 40} more; see memloc.hooks.valid_sites)"]
    hint = f" Did you mean {close}?" if close else ""
    raise SiteError(f"{type(model).__name__} has no site {name!r}.{hint} Valid sites: {shown}")


def resolve_sites(model: nn.Module, names: str | Iterable[str]) -> dict[str, nn.Module]:
    """Resolve several sites at once, before anything runs, so a typo fails fast."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError("No sites given; name at least one (see memloc.hooks.valid_sites(model)).")
    return {n: resolve_site(model, n) for n in names}


def neuron_dim(model: nn.Module, name: str) -> int:
    """Axis of a site's output that indexes neurons: -1 for hook names, 1 for module paths."""
    return -1 if name in _hook_dict(model) else 1


def require_eval(model: nn.Module, what: str = "This analysis") -> None:
    """Refuse a model (or any submodule) in training mode instead of switching it silently."""
    training = [n or type(model).__name__ for n, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(f"{what} needs the model in evaluation mode, but {training[:3]} "
                           f"{'is' if len(training) == 1 else 'are'} in training mode (dropout and batch-norm "
                           "statistics would change the results). Call model.eval() first.")


@contextmanager
def hooks(model: nn.Module, fns: Mapping[str, Callable[[torch.Tensor], Any]],
          inputs: bool = False) -> Iterator[dict[str, nn.Module]]:
    """Run ``fn(output)`` on each site's output during forward passes inside the block.

    ``fn`` may return ``None`` (observe only) or a tensor that replaces the site's output (intervene). With
    ``inputs=True``, ``fn`` sees the site's first positional input instead (a returned tensor replaces it). All
    sites are resolved before any hook is attached, and every hook is removed on exit, also on exceptions.
    """
    mods = resolve_sites(model, list(fns))
    handles = []

    def pre_hook(fn):
        def call(m, args):
            new = fn(args[0])
            return None if new is None else (new, *args[1:])
        return call

    try:
        for name, mod in mods.items():
            fn = fns[name]
            if inputs:
                handles.append(mod.register_forward_pre_hook(pre_hook(fn)))
            else:
                handles.append(mod.register_forward_hook(lambda m, inp, out, fn=fn: fn(out)))
        yield mods
    finally:
        for h in handles:
            h.remove()


def _neuron_map(neurons) -> dict[str, list[int]]:
    if isinstance(neurons, Mapping):
        items = neurons.items()
    else:
        grouped: dict[str, list[int]] = {}
        for entry in neurons:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise ValueError(f"A neuron is a (site, index) pair; got {entry!r}.")
            grouped.setdefault(entry[0], []).append(entry[1])
        items = grouped.items()
    out = {}
    for site, idx in items:
        idx = torch.as_tensor(idx).reshape(-1)
        if idx.dtype == torch.bool:
            idx = torch.nonzero(idx).flatten()
        out[site] = [int(i) for i in idx.tolist()]
    return out


@contextmanager
def scale_neurons(model: nn.Module, neurons, factor: float = 0.0, dim: int | None = None) -> Iterator[None]:
    """Multiply the given neurons' activations by ``factor`` (0 = ablate) for forward passes in the block.

    Args:
        neurons: ``{site: indices}`` (indices: ints or a boolean mask) or a list of ``(site, index)`` pairs.
        dim: neuron axis; default per :func:`neuron_dim`.
    Weights are not modified, so the model is unchanged once the block exits. An index outside the site's
    neuron count is an error at the first forward pass.
    """
    spec = _neuron_map(neurons)
    resolve_sites(model, list(spec))

    def make(site: str, idx: list[int]):
        d = neuron_dim(model, site) if dim is None else dim
        index = torch.tensor(idx, dtype=torch.long)

        def fn(out: torch.Tensor) -> torch.Tensor:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"Site {site!r} returns {type(out).__name__}, not a tensor; pick a hook point "
                                "or submodule whose output is one tensor.")
            n = out.shape[d]
            if len(idx) and (max(idx) >= n or min(idx) < -n):
                raise IndexError(f"Neuron index out of range at {site!r}: it has {n} neurons on dim {d} "
                                 f"(output shape {list(out.shape)}); got indices {sorted(set(idx))[:10]}.")
            scale = torch.ones(n, dtype=out.dtype, device=out.device)
            scale[index.to(out.device)] = factor
            shape = [1] * out.ndim
            shape[d] = n
            return out * scale.view(shape)
        return fn

    with hooks(model, {site: make(site, idx) for site, idx in spec.items()}):
        yield


def ablate(model: nn.Module, neurons, dim: int | None = None):
    """Zero the given neurons inside the block (see :func:`scale_neurons`)."""
    return scale_neurons(model, neurons, factor=0.0, dim=dim)


@contextmanager
def replace_parameters(model: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily overwrite parameters and buffers by name (``model.state_dict()`` keys).

    Typical use: ``with replace_parameters(model, {k: v for k, v in ckpt.items() if k.startswith("layers.1.")})``
    rewinds one layer. Names and shapes are checked before anything is written; on exit (exceptions included)
    the original values are copied back bit for bit. Writes are in place, so optimisers and hooks holding the
    tensors keep working.
    """
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unknown = [k for k in values if k not in state]
    if unknown:
        close = {k: difflib.get_close_matches(k, list(state), n=3) for k in unknown[:3]}
        raise SiteError(f"Unknown parameter/buffer name(s) {unknown[:5]} (closest: {close}). "
                        f"Valid names are the model's state_dict() keys, e.g. {list(state)[:6]}.")
    for k, v in values.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError(f"Shape mismatch for {k!r}: the model has {list(state[k].shape)}, "
                             f"the replacement has {list(v.shape)}.")
    saved = {k: state[k].detach().clone() for k in values}
    try:
        with torch.no_grad():
            for k, v in values.items():
                state[k].copy_(v)
        yield model
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                state[k].copy_(v)


def _inputs_of(data) -> torch.Tensor:
    x = getattr(data, "x", data)
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    return x


def batched_forward(model: nn.Module, data, batch_size: int = 512, progress: bool = False,
                    desc: str = "forward") -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(slice, model(x[slice]))`` over ``data`` (a tensor ``[N, ...]`` or a Dataset) without gradients."""
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"The 'batch_size' parameter must be an int in [1, inf). Got {batch_size!r} instead.")
    x = _inputs_of(data)
    device = model_device(model)
    starts = range(0, len(x), batch_size)
    with torch.no_grad():
        for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
            sl = slice(s, min(s + batch_size, len(x)))
            yield sl, model(x[sl].to(device))


def capture(model: nn.Module, data, sites: str | Sequence[str], batch_size: int = 512,
            progress: bool = False, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
            inputs: bool = False) -> dict[str, torch.Tensor]:
    """Activations of ``sites`` for every example of ``data``, computed batch by batch.

    Args:
        data: ``[N, ...]`` input tensor (token ids ``[N, T]`` for transformers) or a :class:`~memloc.data.Dataset`.
        sites: site name(s); only these are kept, so memory is ``N x`` (site sizes) plus one batch.
        batch_size: the memory knob.
        reduce: optional ``fn(activation_batch) -> smaller tensor`` applied per batch before storing
            (e.g. ``lambda a: a[:, -1]`` for the last token, or ``lambda a: a.flatten(1)``).
        inputs: capture what goes *into* each site (its first positional input) instead of its output, e.g.
            the penultimate features entering a classifier head.
    Returns ``{site: tensor [N, ...]}`` on the CPU in the order of ``data``. The model must be in eval mode.
    """
    require_eval(model, "Activation capture")
    names = [sites] if isinstance(sites, str) else list(sites)
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def keeper(name: str):
        def fn(out):
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"Site {name!r} returns {type(out).__name__}, not a tensor; capture a hook point "
                                "or a submodule whose output is one tensor.")
            a = out.detach()
            store[name].append((reduce(a) if reduce else a).cpu())
        return fn

    with hooks(model, {n: keeper(n) for n in names}, inputs=inputs):
        for _ in batched_forward(model, data, batch_size, progress, desc="capture"):
            pass  # the hooks store the activations; the logits are not needed
    return {n: torch.cat(v) if v else torch.empty(0) for n, v in store.items()}
