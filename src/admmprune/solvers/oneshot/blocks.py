"""Block lists: a transformer's layers (``nn.ModuleList`` of identical blocks), the one-constraint
spec over every outermost list (never routers), and running one block at a time from cached
inputs (``by_layer``: only one block's inputs and Grams are held).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...sets.constraints import Constraint
from ...weights.experts import expert_weights, is_router
from ...weights.gemm import is_conv1d
from ...weights.select import Target
from .capture import _forward, _StopForwardError

__all__: list[str] = []  # internal: the one-shot driver's and LM runs'


def _layer_list(model: nn.Module, targets: list[Target]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of blocks of one class (a transformer's decoder or encoder layers)
    that holds every constrained layer, if there is one."""
    names = [t.module_name for t in targets]
    holding = [(n, m) for n, m in _block_lists(model) if all(t.startswith(f"{n}.") for t in names)]
    return max(holding, key=lambda x: len(x[1]), default=None)


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every non-empty ``nn.ModuleList`` of modules of one class, with its name (one block
    counts: a 1-layer transformer is still a list of layers)."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) >= 1 and len({type(c) for c in m}) == 1
    ]  # fmt: skip


def _gemm_layers(block: nn.Module) -> list[str]:
    """Names (relative to ``block``) of its Linear / ``Conv1D`` layers and fused expert weights,
    never a router (a Linear scoring the experts beside it)."""
    parents = {n: m for n, m in block.named_modules()}
    out = []
    for n, m in block.named_modules():
        parent = parents.get(n.rpartition(".")[0])
        if n and (isinstance(m, nn.Linear) or is_conv1d(m)) and not is_router(n, m, parent):
            out.append(n)
        out += [f"{n}.{a}" if n else a for a in expert_weights(m)]
    return out


def _blocks_spec(model: nn.Module, constraint: Constraint) -> tuple[dict, list[str]]:
    """``{layer name: constraint}`` for every Linear / transformers' ``Conv1D`` / fused expert
    weight inside every outermost ``nn.ModuleList`` of identical blocks (an encoder's and a
    decoder's layers, a vision tower's: a list nested inside a block never replaces the
    block list); and the names of those lists."""
    layers = {n: [_gemm_layers(b) for b in m] for n, m in _block_lists(model)}
    lists = [n for n, per_block in layers.items() if any(per_block)]
    if not lists:
        raise ValueError(
            f"oneshot(model, {constraint!r}, ...): {type(model).__name__} has no list of "
            "identical blocks (transformer layers) holding Linear layers to apply one "
            "constraint to; give a spec {name or glob: constraint}."
        )
    outer = [n for n in lists if not any(n.startswith(f"{o}.") for o in lists)]
    spec = {
        f"{name}.{i}.{n}": constraint
        for name in outer
        for i, names in enumerate(layers[name])
        for n in names
    }
    return spec, outer


def _capture(model, first: nn.Module, batches, device) -> list[tuple[tuple, dict]]:
    """Each batch's ``(args, kwargs)`` into ``first`` (the forward stops there)."""
    store = []

    def pre(module, args, kwargs):
        store.append((args, kwargs))
        raise _StopForwardError

    handle = first.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for i, batch in enumerate(batches, 1):
            with contextlib.suppress(_StopForwardError):
                _forward(model, batch, i, device)
    finally:
        handle.remove()
    if len(store) != len(batches):
        raise ValueError(
            f"{type(first).__name__} (the first block) was not reached by every calibration "
            "batch; pass by_layer=False."
        )
    return store


def _advance(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The next block's inputs: this block's outputs in place of its hidden states."""
    out = []
    for args, kwargs in inputs:
        y = block(*args, **kwargs)
        y = y[0] if isinstance(y, (tuple, list)) else y
        if args:
            out.append(((y, *args[1:]), kwargs))
        else:
            key = next(k for k, v in kwargs.items() if torch.is_tensor(v))
            out.append(((), {**kwargs, key: y}))
    return out


def _twins(model: nn.Module, copy_: nn.Module) -> dict[nn.Module, nn.Module]:
    """Each module of ``model`` → the same module in its deep copy."""
    return dict(zip(model.modules(), copy_.modules(), strict=True))


def _block_runner(block: nn.Module, inputs):
    """``run(i)`` for :func:`_collect`: block ``block`` on batch ``i``'s cached inputs."""

    def run(i: int):
        args, kwargs = inputs[i - 1]
        return block(*args, **kwargs)

    return run


def _bytes(inputs) -> int:
    return sum(
        v.numel() * v.element_size()
        for args, kwargs in inputs
        for v in (*args, *kwargs.values())
        if torch.is_tensor(v)
    )
