"""Parameters, non-zeros and multiply-accumulates (MACs), per layer and in total.

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

__all__ = ["LayerCount", "count"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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


@torch.no_grad()
def count(model: nn.Module, example_input: torch.Tensor) -> dict:
    """Per-layer and total counts for one sample of ``example_input``'s shape.

    Returns ``{"layers": [LayerCount...], "params", "nonzero", "macs", "sparse_macs"}`` where the
    totals cover every parameter (params, nonzero) and every Conv/Linear (MACs).
    """
    batch = example_input.shape[0]
    layers: list[LayerCount] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, _inputs, output):
        w = module.weight
        per_sample = output.numel() // batch
        positions = per_sample // w.shape[0]
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

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _LAYERS)]
    was_training = model.training
    model.eval()
    try:
        model(example_input)
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
    }
