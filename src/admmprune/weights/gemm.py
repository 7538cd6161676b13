"""Facts about a layer's weight as a GEMM (rows = outputs, columns = inputs), the view every
set, count and storage format reads: transformers' ``Conv1D`` stored ``[in, out]``, the raw GEMM
weights of attention and recurrent layers, fused expert weights ``[E, out, in]``.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import expert_weights, is_transposed

__all__: list[str] = []  # internal: the GEMM view every layer reads

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def layer_types(model: nn.Module) -> tuple[type, ...]:
    """The producer layer types: Conv/Linear, and the model's ``Conv1D`` class if it has one."""
    extra = {type(m) for m in model.modules() if is_conv1d(m)}
    return (*_LAYERS, *sorted(extra, key=str))


def raw_weights(module: nn.Module) -> list[str]:
    """The GEMM weights a layer keeps as raw parameters rather than a ``weight``:
    ``nn.MultiheadAttention``'s input projections and ``nn.LSTM``/``GRU``/``RNN``'s
    ``weight_ih_l*`` / ``weight_hh_l*`` (each ``[out, in]``, gates stacked along ``out``)."""
    if isinstance(module, nn.MultiheadAttention):
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    elif isinstance(module, nn.RNNBase):
        names = tuple(
            n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_")
        )
    else:
        return []
    return [n for n in names if isinstance(getattr(module, n, None), nn.Parameter)]


def layer_weights(model: nn.Module) -> set[str]:
    """State-dict names of every Conv/Linear (and transformers' ``Conv1D``, stored ``[in, out]``)
    weight and every raw GEMM weight of attention and recurrent layers (``in_proj_weight``,
    ``weight_ih_l0`` …) and fused expert weight (``experts.gate_up_proj``): the tensors stored
    in a sparse format."""
    out = set()
    for n, m in model.named_modules():
        if isinstance(m, _LAYERS) or is_conv1d(m):
            out.add(f"{n}.weight" if n else "weight")
        out.update(f"{n}.{a}" if n else a for a in raw_weights(m) + expert_weights(m))
    return out


def expert_layouts(model: nn.Module) -> dict[str, bool]:
    """Fused expert weights by state-dict name → stored ``[E, in, out]`` (transposed)."""
    return {
        f"{n}.{a}" if n else a: is_transposed(m)
        for n, m in model.named_modules()
        for a in expert_weights(m)
    }


def gemm_view(W: torch.Tensor, transposed: bool = False, experts: bool = False) -> torch.Tensor:
    """A stored weight as the matrix storage formats see (rows = outputs): ``Wᵀ`` for
    ``[in, out]``; a fused experts weight as its experts' GEMMs stacked, ``[E·out, in]``."""
    if experts:
        return (W.transpose(1, 2) if transposed else W).reshape(-1, W.shape[1 if transposed else 2])
    return W.T if transposed else W


def transposed_weights(model: nn.Module) -> set[str]:
    """State-dict names of the weights stored ``[in, out]`` (transformers' ``Conv1D``): their
    GEMM view, the one storage formats see (rows = outputs, N:M along the inputs), is ``W.T``."""
    return {f"{n}.weight" if n else "weight" for n, m in model.named_modules() if is_conv1d(m)}
