r"""Mixture-of-experts weights stored fused, one 3-D parameter for all experts of a layer.

transformers 5 keeps a MoE layer's experts as ``gate_up_proj [E, out, in]`` and
``down_proj [E, out, in]`` (``[E, in, out]`` where the class says ``is_transposed``) inside
one experts module, which runs expert ``e`` as the GEMM ``Y_e = X_e W_eᵀ`` on the tokens
routed to it, ``W_e = param[e]``. Each expert slice is a layer of its own to the constraints
(its own GEMM view, its own kept count) and to one-shot pruning (its own Gram
``H_e = X_eᵀX_e`` from exactly its tokens).

:class:`ExpertTap` sees those GEMMs without knowing the model: inside the experts' eager
forward, ``param[e]`` is a view handed to ``F.linear`` (or ``x @ param[e]`` when transposed);
a torch function mode notes each slice taken from a known parameter and calls back with the
GEMM's input. :func:`eager_experts` selects that eager forward for the time of a calibration
(the grouped / batched kernels compute the same outputs in one call for all experts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional
from torch.overrides import TorchFunctionMode

__all__: list[str] = []  # internal: used by select and oneshot

#: (experts module, parameter attribute, expert index): one expert's GEMM
Site = tuple[nn.Module, str, int]


def num_experts(module: nn.Module) -> int | None:
    """``module.num_experts`` if it is an experts container (an int ≥ 1), else None."""
    n = getattr(module, "num_experts", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None


def expert_weights(module: nn.Module) -> list[str]:
    """The attributes of ``module``'s fused expert GEMM weights: its own 3-D parameters with
    one slice per expert (biases excluded)."""
    E = num_experts(module)
    if E is None:
        return []
    return [
        n
        for n, p in module.named_parameters(recurse=False)
        if p.ndim == 3 and p.shape[0] == E and "bias" not in n
    ]


def is_transposed(module: nn.Module) -> bool:
    """Whether the experts store ``[E, in, out]`` (transformers' ``is_transposed``)."""
    return bool(getattr(module, "is_transposed", False))


def is_router(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """A Linear that scores experts (a router, or a shared expert's 1-output gate): its parent
    also holds an experts container and it has 1 or ``num_experts`` outputs."""
    if parent is None or not isinstance(module, nn.Linear):
        return False
    counts = {num_experts(c) for c in parent.children() if expert_weights(c)}
    return bool(counts) and (module.out_features == 1 or module.out_features in counts)


@contextlib.contextmanager
def eager_experts(model: nn.Module) -> Iterator[None]:
    """Run every fused experts module of ``model`` with its eager per-expert loop (restored
    after), so :class:`ExpertTap` sees one GEMM per routed expert."""
    changed = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if expert_weights(m) and cfg is not None and hasattr(cfg, "_experts_implementation"):
            changed.append((cfg, cfg._experts_implementation))
    try:
        for cfg, _ in changed:
            cfg._experts_implementation = "eager"
        yield
    finally:
        for cfg, old in reversed(changed):
            cfg._experts_implementation = old


class ExpertTap(TorchFunctionMode):
    """Calls ``pre(site, x)`` before and ``post(site, y)`` after each watched expert's GEMM
    ``y`` (a tensor ``post`` returns replaces ``y`` in the forward).

    ``watch`` maps sites ``(module, attr, e)`` to ``(pre, post)`` (either may be None);
    ``layouts`` records how each watched parameter's slices were multiplied (``"linear"`` or
    ``"matmul"``). A slice used in a way this tap does not know (not a plain ``F.linear`` /
    matmul on it) is simply not seen; :func:`admmprune.oneshot` refuses a module whose
    experts ran unseen.
    """

    def __init__(self, params: dict[int, tuple[nn.Module, str]], watch: dict) -> None:
        super().__init__()
        self._params = params  # id(parameter) → (module, attr)
        self._watch = watch
        self._slices: dict[int, tuple[Site, torch.Tensor]] = {}
        self.layouts: dict[tuple[nn.Module, str], str] = {}  # how each parameter was used

    @classmethod
    def over(cls, sites: dict[Site, tuple[Callable | None, Callable | None]]) -> ExpertTap:
        params = {id(getattr(m, a)): (m, a) for m, a, _ in sites}
        return cls(params, sites)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and id(args[0]) in self._params:
            out = func(*args, **kwargs)
            e = _index(args[1])
            if e is not None:
                m, a = self._params[id(args[0])]
                self._slices[id(out)] = ((m, a, e), out)  # holding out keeps its id unique
            return out
        if func is functional.linear or func in _MATMUL:
            x, weight = args[0], args[1]
            how = "linear" if func is functional.linear else "matmul"
            hit = self._slices.pop(id(weight), None)
            if hit is not None:
                site = hit[0]
                self.layouts[site[:2]] = how
                pre, post = self._watch.get(site, (None, None))
                if pre is not None:
                    pre(site, x)
                out = func(*args, **kwargs)
                if post is not None:
                    swap = post(site, out)
                    out = out if swap is None else swap
                return out
        return func(*args, **kwargs)


# ``x @ w`` reaches a mode as TensorBase.matmul, ``torch.matmul(x, w)`` as torch.matmul
_MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


def _index(i) -> int | None:
    """An integer index (a Python int or a 0-d integer tensor) as an int, else None."""
    if isinstance(i, int) and not isinstance(i, bool):
        return i
    if torch.is_tensor(i) and i.dim() == 0 and not i.is_floating_point():
        return int(i)
    return None
