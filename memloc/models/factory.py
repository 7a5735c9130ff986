"""Model factories: how memloc builds *your* model wherever it needs a fresh or a loaded copy.

Everything in memloc that trains a model (retraining, second-split forgetting, holdout retraining, the
unlearning oracle, Feldman-Zhang / C-score / LiRA ensembles) builds it through a :class:`ModelFactory`, never
from a registry substitute. A factory is made from

- a registered name (``"mlp"``, ``"resnet9"`` ... with ``input_shape``, ``num_classes`` and keyword arguments),
- a zero-argument callable returning an ``nn.Module`` (a class with default arguments, a function, a lambda),
- an importable ``"package.module:name"`` string (recorded in a run folder, so a run can rebuild its model
  when it is reopened, also from the command line), or
- an ``nn.Module`` instance, used as a template: copies are deep copies; a fresh initialisation calls
  ``reset_parameters()`` on every submodule that has one (an error names the parameters no submodule resets).

``factory.new(seed)`` builds a model with its initialisation drawn from ``seed`` (the global RNG is forked and
restored, so nothing outside changes). :func:`load_state` loads a state dict with errors that name the missing,
unexpected and mis-shaped keys.
"""
from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["ModelFactory", "as_factory", "load_state", "import_object", "describe"]


def import_object(spec: str) -> Any:
    """Import ``"package.module:name"`` (``name`` may be dotted). The current directory is importable."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"A model factory given by name must look like 'package.module:name'. Got {spec!r} instead.")
    mod_name, _, attr = spec.partition(":")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"Cannot import the model factory {spec!r}: {e}.") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"Cannot import the model factory {spec!r}: module {mod_name!r} has no {attr!r}.")
        obj = getattr(obj, part)
    return obj


def describe(obj: Any) -> str:
    """``module.QualName`` of a class, function or module instance (what a run records about its model)."""
    t = obj if isinstance(obj, type) or callable(obj) and not isinstance(obj, nn.Module) else type(obj)
    return f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', type(t).__name__)}"


def _importable_name(obj: Any) -> str | None:
    """``"module:qualname"`` if ``obj`` can be imported back by that name, else None."""
    mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not mod or not qual or mod == "__main__" or "<" in qual:
        return None
    try:
        return f"{mod}:{qual}" if import_object(f"{mod}:{qual}") is obj else None
    except Exception:
        return None


class ModelFactory:
    """Builds one architecture. ``new(seed=None)``: a model with a (seeded) fresh initialisation.

    Attributes: ``kind`` (``"registry"``, ``"callable"``, ``"import"``, ``"template"``), ``name`` (what it
    builds, for messages and settings) and ``spec`` (a JSON-able record; ``None`` for a callable or template
    that cannot be imported back by name).
    """

    def __init__(self, kind: str, build: Callable[[], nn.Module], name: str, spec: dict | None,
                 template: nn.Module | None = None):
        self.kind, self._build, self.name, self.spec, self._template = kind, build, name, spec, template

    def __repr__(self) -> str:
        return f"ModelFactory({self.kind}: {self.name})"

    def new(self, seed: int | None = None) -> nn.Module:
        """A new model; with ``seed``, its initialisation is drawn from a private copy of the RNG seeded so."""
        if self._template is not None:
            return self._fresh_template(seed)
        if seed is None:
            model = self._build()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                model = self._build()
        if not isinstance(model, nn.Module):
            raise TypeError(f"The model factory {self.name} returned {type(model).__name__}, not an nn.Module.")
        return model

    def architecture(self) -> nn.Module:
        """A model to load weights into: its own initial values do not matter, and the global RNG is untouched."""
        if self._template is not None:
            return copy.deepcopy(self._template)
        return self.new(0)

    def _fresh_template(self, seed: int | None) -> nn.Module:
        model = copy.deepcopy(self._template)
        if seed is None:
            return model
        covered: set[int] = set()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for mod in model.modules():
                if hasattr(mod, "reset_parameters") and callable(mod.reset_parameters):
                    mod.reset_parameters()
                    covered |= {id(p) for p in mod.parameters(recurse=False)}
        missed = [n for n, p in model.named_parameters() if id(p) not in covered]
        if missed:
            raise ValueError(f"A fresh initialisation of {self.name} is needed, but memloc was given a model instance "
                             f"and no submodule resets {missed[:5]}. Pass a zero-argument factory instead (the model "
                             "class, or a function that builds it), so memloc can build new copies.")
        return model


def as_factory(model: Any, input_shape: Sequence[int] | None = None, num_classes: int | None = None,
               **kwargs: Any) -> ModelFactory:
    """A :class:`ModelFactory` from a registered name, a zero-argument callable, an importable
    ``"module:name"`` string, an ``nn.Module`` template, or a factory (returned as is)."""
    from . import MODELS, build_model

    if isinstance(model, ModelFactory):
        return model
    if isinstance(model, str) and model in MODELS:
        if input_shape is None or num_classes is None:
            raise ValueError(f"Building the registered model {model!r} needs input_shape and num_classes.")
        shape, k = tuple(int(s) for s in input_shape), int(num_classes)
        return ModelFactory("registry", lambda: build_model(model, shape, k, **kwargs), model,
                            {"kind": "registry", "name": model, "input_shape": list(shape), "num_classes": k,
                             "kwargs": dict(kwargs)})
    if isinstance(model, str):
        if ":" not in model:
            raise ValueError(f"Unknown model {model!r}: give a registered name {sorted(MODELS)}, an importable "
                             "'package.module:name' factory, a zero-argument callable or an nn.Module.")
        obj = import_object(model)
        if isinstance(obj, nn.Module):
            return ModelFactory("template", lambda: copy.deepcopy(obj), describe(obj), None, template=obj)
        return ModelFactory("import", obj, model, {"kind": "import", "name": model})
    if isinstance(model, nn.Module):
        return ModelFactory("template", lambda: copy.deepcopy(model), describe(model), None, template=model)
    if callable(model):
        name = _importable_name(model)
        spec = {"kind": "import", "name": name} if name else None
        return ModelFactory("callable", model, describe(model), spec)
    raise TypeError(f"A model must be a registered name, a zero-argument factory, an importable 'module:name' "
                    f"string or an nn.Module; got {type(model).__name__}.")


def factory_from_spec(spec: Mapping[str, Any]) -> ModelFactory:
    """Rebuild a factory from the ``spec`` a run recorded."""
    if spec.get("kind") == "registry":
        return as_factory(spec["name"], spec["input_shape"], spec["num_classes"], **spec.get("kwargs", {}))
    if spec.get("kind") == "import":
        return as_factory(spec["name"])
    raise ValueError(f"Unknown model factory record {dict(spec)!r}.")


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str = "the checkpoint") -> nn.Module:
    """``model.load_state_dict(state)`` with an error that names what does not match.

    Missing and unexpected keys are listed (and a ``module.`` prefix from ``DataParallel`` is pointed out);
    shape mismatches name the key and both shapes. Tensors are copied onto the model's own device.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, list(own[k].shape), list(state[k].shape)) for k in own
              if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} ({len(unexpected)})")
        if shapes:
            parts.append("shape mismatches " + ", ".join(f"{k}: model {a} vs checkpoint {b}" for k, a, b in shapes[:4]))
        hint = ""
        if unexpected and all(k.startswith("module.") for k in state):
            hint = " The checkpoint's keys start with 'module.' (saved from DataParallel); strip that prefix."
        raise ValueError(f"{what} does not fit {type(model).__name__}: {'; '.join(parts)}. The model factory must "
                         f"build the architecture the checkpoints were saved from.{hint}")
    model.load_state_dict(state)
    return model
