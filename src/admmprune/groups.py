"""Coupled channel groups: structured sparsity that is always physically removable.

Channels joined by BatchNorm, element-wise ops and residual additions can only be removed
together. A :class:`ChannelGroup` lists, for each of its ``n`` channels ``j``, the slice of every
*producer* parameter that writes it: the output rows of each Conv/Linear weight, the bias entries,
and the BatchNorm affine entries. The set

    S = { W : at most k of the n channels have any non-zero producer slice }

has the exact Euclidean projection (the slices of different channels are disjoint)::

    score_j = Σ_members ||W_member[idx_member[j]]||²,   keep the k largest, zero the rest

Everything it zeroes is removed by :func:`admmprune.compact.compact`, exactly.

``norm="l1"`` ranks channels by ``Σ_members ||W_member[idx_member[j]]||₁`` instead (Li et al.'s
L1-norm filter pruning, made group-aware): a one-shot selection rule, not a Euclidean
projection, so ADMM must not use it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .constraints import _check_keep, keep_count, topk_mask

__all__ = ["ChannelGroup", "channel_groups"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class ChannelGroup:
    """``n`` coupled channels; ``members[p][j]`` is the row of parameter ``p`` for channel ``j``."""

    name: str
    keep: float
    members: tuple[tuple[str, tuple[int, ...]], ...]
    norm: str = "l2"  # "l2": the Euclidean projection; "l1": rank by L1 norm (one-shot only)

    @property
    def n(self) -> int:
        return len(self.members[0][1])

    def __repr__(self) -> str:
        return f"ChannelGroup({self.name!r}, keep={self.keep:g}, n={self.n})"

    @torch.no_grad()
    def project(self, V: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Π_S over the whole group (with ``norm="l1"``: the L1-ranked selection):
        ``(Z, support)`` per member parameter name."""
        score = None
        for pname, rows in self.members:
            v = V[pname].float()
            idx = torch.tensor(rows, device=v.device)
            s = v.index_select(0, idx).reshape(len(rows), -1)
            s = s.abs().sum(1) if self.norm == "l1" else s.pow(2).sum(1)
            score = s if score is None else score + s
        kept = topk_mask(score, keep_count(self.keep, self.n))
        Z, support = {}, {}
        for pname, rows in self.members:
            v = V[pname]
            mask = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
            mask[torch.tensor(rows, device=v.device)[~kept]] = False
            full = mask.view(-1, *([1] * (v.ndim - 1))).expand_as(v)
            Z[pname] = torch.where(full, v, 0)
            support[pname] = full.contiguous()
        return Z, support


def channel_groups(
    model: nn.Module,
    example_input: torch.Tensor,
    keep: float,
    *,
    layers: str | None = None,
    ignored_layers: list[nn.Module] | None = None,
    norm: str = "l2",
) -> list[ChannelGroup]:
    """The coupled channel groups of ``model``, each to keep ``keep`` of its channels
    (``norm``: ``"l2"``, the projection ADMM needs, or ``"l1"`` for one-shot L1 ranking).

    ``layers`` (a glob on the group's root layer name) selects groups; the model's output layer
    is left alone unless ``ignored_layers`` says otherwise.
    """
    import torch_pruning as tp

    from .compact import _output_layers

    keep = _check_keep("channel_groups", keep)
    if norm not in ("l1", "l2"):
        raise ValueError(f"channel_groups(norm={norm!r}): use 'l2' (ADMM) or 'l1' (one-shot).")
    names = {m: n for n, m in model.named_modules()}
    was_training = model.training
    model.eval()  # tracing runs a forward; batch-1 inputs would trip BatchNorm in train mode
    try:
        ignored = (
            ignored_layers if ignored_layers is not None else _output_layers(model, example_input)
        )
        DG = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    finally:
        model.train(was_training)
    out = []
    for group in DG.get_all_groups(ignored_layers=ignored, root_module_types=list(_LAYERS)):
        root = names[group.items[0].dep.target.module]
        if layers is not None and not fnmatch.fnmatchcase(root, layers):
            continue
        n = len(group.items[0].idxs)
        members: dict[str, tuple[int, ...]] = {}
        for item in group.items:
            m = item.dep.target.module
            if item.dep.handler.__name__ != "prune_out_channels" or len(item.idxs) != n:
                continue
            if not isinstance(m, _LAYERS + _NORMS):
                continue
            rows = tuple(int(i) for i in item.idxs)
            for attr in ("weight", "bias"):
                if isinstance(getattr(m, attr, None), nn.Parameter):
                    members[f"{names[m]}.{attr}"] = rows
        if members:
            out.append(ChannelGroup(root, keep, tuple(members.items()), norm))
    if not out:
        raise ValueError(f"no channel group matches layers={layers!r} in {type(model).__name__}.")
    return out
