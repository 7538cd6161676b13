"""Calling a user's model the same way everywhere: ``model(**x)`` for a dict (Hugging Face
batches) and ``model(x)`` otherwise, its floating outputs, Hugging Face caches off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__: list[str] = []  # internal


def call(model: nn.Module, x: Any) -> Any:
    """The model's forward on ``x``: ``model(**x)`` for a dict (HF batches), else ``model(x)``."""
    return model(**x) if isinstance(x, dict) else model(x)


def floats(out: Any) -> list[torch.Tensor]:
    """Every floating tensor in a model output (tensor, tuple/list, dict, HF ModelOutput)."""
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in floats(o)]
    return []


@contextlib.contextmanager
def no_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face models with ``use_cache`` off (their cache objects are not tensors)."""
    configs = [
        c for c in {id(m): getattr(m, "config", None) for m in model.modules()}.values()
        if c is not None and getattr(c, "use_cache", None)
    ]  # fmt: skip
    for c in configs:
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs:
            c.use_cache = True
