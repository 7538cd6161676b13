"""Model zoo: the networks of the pruning papers, torchvision's, or any ``pkg.module:factory``.

Every factory takes ``num_classes``, ``in_channels`` and ``input_size`` (the data's shape), so a
recipe names a model and the data fills in the rest.
"""

from __future__ import annotations

import importlib
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
    if name in MODELS:
        return MODELS[name](
            num_classes=num_classes, in_channels=in_channels, input_size=input_size, **kwargs
        )
    tv = name.removeprefix("torchvision:")
    if name.startswith("torchvision:") or (":" not in name and tv in _torchvision_names()):
        import torchvision

        if tv not in _torchvision_names():
            raise ValueError(f"torchvision has no model {tv!r}; e.g. resnet18, mobilenet_v2.")
        if in_channels != 3:
            raise ValueError(
                f"torchvision's {tv} expects 3-channel images, the data has {in_channels}."
            )
        return torchvision.models.get_model(tv, num_classes=num_classes, **kwargs)
    if is_import_path(name):
        module_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot import model factory {name!r}: {exc}") from None
        try:
            model = factory(**kwargs)
        except TypeError as exc:  # most often: kwargs the factory does not take
            raise ValueError(f"model factory {name!r} with kwargs {kwargs}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name!r} returned {type(model).__name__}, not an nn.Module.")
        return model
    raise ValueError(
        f"unknown model {name!r}; built in: {', '.join(MODELS)}; or any torchvision model "
        "(e.g. resnet18), or an import path 'package.module:factory'."
    )
