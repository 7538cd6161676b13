"""Physically smaller models from structured sparsity (StructADMM's speedups are measured here).

Channels are coupled: a conv's output channel feeds its BatchNorm, the ReLU, a residual addition
shared with other convs, a concatenation, and the input slices of every consumer. Torch-Pruning's
``DependencyGraph`` (pinned; used only through this module) traces the model and returns those
coupled sets as groups.

A channel of a group is *removable* when every producer of it carries exactly zero: the output
rows of each Conv/Linear (weights and bias) and the affine weight and bias of each norm layer.
Then the channel is identically 0 after every element-wise op (zero padding keeps it 0), the
consumers' input slices for it contribute nothing, and removing the whole group slice leaves the
network's function unchanged. Channels zeroed in some producers but not all cannot be removed;
:func:`compact` counts them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .accounting import count

__all__ = ["CompactReport", "compact", "zero_dead_inputs"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class CompactReport:
    """What :func:`compact` removed, and the zeroed channels it had to keep."""

    removed: dict[str, int] = field(default_factory=dict)  # root layer → channels removed
    not_removable: dict[str, int] = field(default_factory=dict)  # zero in some producers only
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0  # Conv/Linear MACs per sample of the example input's shape
    macs_after: int = 0
    sparse_macs_after: int = 0  # of those, with a non-zero weight (e.g. after column pruning)

    @property
    def mac_reduction(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    @property
    def total_not_removable(self) -> int:
        return sum(self.not_removable.values())


@torch.no_grad()
def _zero_out(module: nn.Module, idx: int) -> bool | None:
    """Is output channel ``idx`` of a producer exactly zero? ``None``: not a producer."""
    if isinstance(module, _LAYERS):
        zero = not bool(module.weight[idx].any())  # row idx: one output channel/neuron
        return zero and (module.bias is None or float(module.bias[idx]) == 0.0)
    if isinstance(module, _NORMS):
        if getattr(module, "weight", None) is None:
            return False  # no affine: a constant channel is not zero
        return float(module.weight[idx]) == 0.0 and float(module.bias[idx]) == 0.0
    return None


def _output_layers(model: nn.Module, example_input) -> list[nn.Module]:
    """The last Conv/Linear to run in forward: its outputs are the model's, never removed."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda mod, *_: order.append(mod))
        for m in model.modules()
        if isinstance(m, _LAYERS)
    ]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return order[-1:]


def _name_of(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def _removable(model: nn.Module, example_input: torch.Tensor, ignored: list[nn.Module]):
    """The dependency graph, and per channel group ``(root, handler, root indices of the
    removable channels, not-removable count)``; a layer always keeps one channel."""
    import torch_pruning as tp

    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    plans = []
    for group in DG.get_all_groups(ignored_layers=ignored, root_module_types=list(_LAYERS)):
        root = group.items[0].dep.target.module
        n = len(group.items[0].idxs)
        producers = []
        for item in group.items:
            handler = getattr(item.dep.handler, "__name__", "")
            if handler == "prune_out_channels" and len(item.idxs) == n:
                producers.append((item.dep.target.module, [int(i) for i in item.idxs]))
        zero_in = [[_zero_out(m, idxs[j]) for m, idxs in producers] for j in range(n)]
        removable = [
            j
            for j in range(n)
            if zero_in[j] and all(z is not False for z in zero_in[j]) and any(z for z in zero_in[j])
        ]
        partial = sum(1 for j in range(n) if any(zero_in[j]) and j not in set(removable))
        if len(removable) == n:  # never leave a layer with no channels at all
            removable = removable[1:]
            partial += 1
        root_idxs = [int(i) for i in group.items[0].idxs]
        plans.append((root, group.items[0].dep.handler, [root_idxs[j] for j in removable], partial))
    return DG, plans


def compact(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    ignored_layers: list[nn.Module] | None = None,
    inplace: bool = False,
) -> tuple[nn.Module, CompactReport]:
    """Remove every removable zero channel; return the smaller model and a report.

    ``example_input`` traces the graph (any batch size). The last layer's outputs are kept
    (they are the model's outputs) unless ``ignored_layers`` says otherwise. The model is
    copied first unless ``inplace``. In eval mode, the compacted model's outputs equal the
    masked model's up to float rounding.
    """
    small = model if inplace else copy.deepcopy(model)
    was_training = small.training
    small.eval()
    ignored = ignored_layers if ignored_layers is not None else _output_layers(small, example_input)
    if not inplace and ignored_layers is not None:  # map the caller's modules onto the copy
        names = _name_of(model)
        lookup = dict(small.named_modules())
        ignored = [lookup[names[m]] for m in ignored_layers]
    report = CompactReport(
        params_before=sum(p.numel() for p in small.parameters()),
        macs_before=count(small, example_input)["macs"],
    )
    DG, plans = _removable(small, example_input, ignored)
    names = _name_of(small)
    for root, handler, idxs, partial in plans:
        name = names.get(root, type(root).__name__)
        if partial:
            report.not_removable[name] = partial
        if idxs:
            DG.get_pruning_group(root, handler, idxs).prune()
            report.removed[name] = len(idxs)
    report.params_after = sum(p.numel() for p in small.parameters())
    after = count(small, example_input)
    report.macs_after, report.sparse_macs_after = after["macs"], after["sparse_macs"]
    small.train(was_training)
    return small, report


def zero_dead_inputs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Zero, in place, every consumer weight that reads a removable channel; returns how many
    weights that zeroed.

    Such a weight multiplies a channel that is identically 0, so the model's function does not
    change; what changes is what it stores: the consumer's input slice of a pruned filter (a
    column block of the next conv, the Linear's inputs after a flatten) is zero, as it is
    absent from the compact model. The storage accounting of a structured model needs it.
    """
    was_training = model.training
    model.eval()
    try:
        DG, plans = _removable(model, example_input, _output_layers(model, example_input))
        zeroed = 0
        for root, handler, idxs, _ in plans:
            if not idxs:
                continue
            for item in DG.get_pruning_group(root, handler, idxs).items:
                m = item.dep.target.module
                if getattr(item.dep.handler, "__name__", "") != "prune_in_channels":
                    continue
                if not isinstance(m, _LAYERS) or getattr(m, "groups", 1) != 1:
                    continue  # grouped/depthwise convs: their inputs are their outputs' channels
                cols = torch.as_tensor([int(i) for i in item.idxs], device=m.weight.device)
                with torch.no_grad():  # not around the tracing: the graph needs autograd
                    zeroed += int(m.weight[:, cols].count_nonzero())
                    m.weight[:, cols] = 0
    finally:
        model.train(was_training)
    return zeroed
