"""Parameters, non-zeros, multiply-accumulates (MACs) and storage bits, per layer and in total.

For a layer whose weight is used at ``P`` output positions per sample (``P = H_out·W_out`` for a
2-D conv, the number of rows for a Linear: 1 on ``[B, F]`` inputs):

    dense MACs  = P · (weights of the layer)          (what the dense kernel computes)
    sparse MACs = P · (non-zero weights)              (the lower bound skipping every zero)

A compacted model's dense MACs are what it really computes: compare them with the original's to
get the MAC reduction that structured pruning turned into smaller layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .forward import call, no_cache
from .gemm import _LAYERS, is_conv1d

__all__ = ["LayerCount", "count"]


@dataclass
class LayerCount:
    name: str
    kind: str
    shape: tuple[int, ...]
    params: int  # weight + bias
    nonzero: int  # non-zero weights + biases
    positions: int  # output positions per sample the weight is applied at
    macs: int  # dense MACs per sample
    sparse_macs: int  # MACs per sample skipping zero weights

    def as_dict(self) -> dict:
        return asdict(self)


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:  # shapes
    """The CPU flash-attention kernel, which ``FlopCounterMode`` has no formula for: the
    same count as every other SDPA kernel (two matrix products per head)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


@torch.no_grad()
def count(model: nn.Module, example_input) -> dict:
    """Per-layer and total counts for one sample of ``example_input``'s shape (a tensor, a
    dict of tensors for Hugging Face models: the batch is the first tensor's first dim, or a
    list of images for a torchvision detector: one sample each).

    Returns ``{"layers": [LayerCount...], "params", "nonzero", "macs", "sparse_macs",
    "all_macs"}`` where the totals cover every parameter (params, nonzero) and every
    Conv/Linear (MACs); ``all_macs`` is every matrix product the forward actually runs, counted
    by torch's ``FlopCounterMode`` (flops / 2): attention's score and value products and raw
    projections (``nn.MultiheadAttention``, LSTMs) included.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if isinstance(example_input, (list, tuple)):  # a detector's list of images
        batch = len(example_input)
    else:
        x = example_input
        batch = (next(iter(x.values())) if isinstance(x, dict) else x).shape[0]
    layers: list[LayerCount] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, _inputs, output):
        w = module.weight
        per_sample = output.numel() // batch
        positions = per_sample // (w.shape[1] if is_conv1d(module) else w.shape[0])
        b = module.bias
        layers.append(
            LayerCount(
                name=names[module],
                kind=type(module).__name__,
                shape=tuple(w.shape),
                params=w.numel() + (b.numel() if b is not None else 0),
                nonzero=int(torch.count_nonzero(w))
                + (int(torch.count_nonzero(b)) if b is not None else 0),
                positions=positions,
                macs=positions * w.numel(),
                sparse_macs=positions * int(torch.count_nonzero(w)),
            )
        )

    hooks = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, _LAYERS) or is_conv1d(m)
    ]
    was_training = model.training
    model.eval()
    flops = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
    try:
        # with autograd on, nn.MultiheadAttention takes its composite path, whose matrix
        # products the counter sees (the fused inference kernel is opaque to it)
        with flops, torch.enable_grad(), no_cache(model):
            call(model, example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    params = list(model.parameters())
    return {
        "layers": layers,
        "params": sum(p.numel() for p in params),
        "nonzero": sum(int(torch.count_nonzero(p)) for p in params),
        "macs": sum(layer.macs for layer in layers),
        "sparse_macs": sum(layer.sparse_macs for layer in layers),
        "all_macs": flops.get_total_flops() // 2 // max(batch, 1),
    }
