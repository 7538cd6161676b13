"""Model zoo: the networks of the pruning papers, torchvision's, or any ``pkg.module:factory``.

The built-in factories take ``num_classes``, ``in_channels`` and ``input_size`` (the data's
shape), so a recipe names a model and the data fills in the rest. A user factory
``pkg.module:factory`` gets the recipe's ``model.kwargs``, plus each of ``num_classes``,
``in_channels`` and ``input_size`` that it names as a parameter (``kwargs`` win)::

    def factory(num_classes: int, width: int = 64) -> nn.Module: ...

The module is imported from the current folder first, as ``python -m`` would.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable

from torch import nn

from .cifar import resnet20, resnet32, resnet56, vgg16
from .lenet import LeNet5, LeNet300

__all__ = [
    "MODELS",
    "LeNet5",
    "LeNet300",
    "build_model",
    "resnet20",
    "resnet32",
    "resnet56",
    "vgg16",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet5": LeNet5,
    "lenet300": LeNet300,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "vgg16": vgg16,
}


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def is_import_path(name: str) -> bool:
    """Whether building ``name`` would import user code (``package.module:factory``)."""
    return ":" in name and not name.startswith("torchvision:")


def build_model(
    name: str, *, num_classes: int, in_channels: int, input_size: int, kwargs: dict | None = None
) -> nn.Module:
    """Build ``name``: ours, ``torchvision:NAME`` (or a plain torchvision name), or ``pkg.mod:fn``.

    An import path runs the user's own code: only names the user wrote explicitly get imported.
    """
    kwargs = dict(kwargs or {})
    shape = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    if name in MODELS:
        return _call(name, MODELS[name], {**shape, **kwargs}, kwargs)
    tv = name.removeprefix("torchvision:")
    if name.startswith("torchvision:") or (":" not in name and tv in _torchvision_names()):
        import torchvision

        if tv not in _torchvision_names():
            raise ValueError(f"torchvision has no model {tv!r}; e.g. resnet18, mobilenet_v2.")
        if in_channels != 3:
            raise ValueError(
                f"torchvision's {tv} expects 3-channel images, the data has {in_channels}."
            )
        factory = torchvision.models.get_model_builder(tv)
        return _call(name, factory, {"num_classes": num_classes, **kwargs}, kwargs)
    if is_import_path(name):
        factory = _import_factory(name)
        params = _parameters(factory)
        named = {k: v for k, v in shape.items() if k in params}
        model = _call(name, factory, {**named, **kwargs}, kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name!r} returned {type(model).__name__}, not an nn.Module.")
        return model
    raise ValueError(
        f"unknown model {name!r}; built in: {', '.join(MODELS)}; or any torchvision model "
        "(e.g. resnet18), or an import path 'package.module:factory'."
    )


def _parameters(factory: Callable) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return {}


def _import_factory(name: str) -> Callable:
    """``pkg.mod:fn``, with the current folder on the import path for this import only."""
    module_name, _, attr = name.partition(":")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import model factory {name!r}: {exc}") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())


def _call(name: str, factory: Callable, arguments: dict, user_kwargs: dict) -> nn.Module:
    """``factory(**arguments)``; arguments it does not take are an error naming those it does."""
    params = _parameters(factory)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(user_kwargs) - set(accepted)) if params and not takes_any else []
    if unknown:
        raise ValueError(
            f"model {name!r} does not take {', '.join(map(repr, unknown))} in model.kwargs; "
            f"it accepts: {', '.join(accepted) or 'no arguments'}."
        )
    try:
        return factory(**arguments)
    except TypeError as exc:  # e.g. a keyword swallowed by **kwargs further down
        hint = f"; it accepts: {', '.join(accepted)}" if accepted and not takes_any else ""
        raise ValueError(f"model {name!r} with kwargs {user_kwargs}: {exc}{hint}") from None
