"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 registers each parameter as a ``DTensor`` placed ``Shard(0)`` on a 1-D device mesh: rank
``r`` holds a contiguous block of whole rows (for a fused experts weight ``[E, out, in]``: of
whole experts), in rank order. ADMM keeps its state for that block only and projects it there;
a set whose projection needs the whole tensor (a per-tensor top-k) agrees across ranks through
:mod:`admmprune.sets.sharded`. Everything else reads the local block through :func:`local`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..sets import sharded
from ..sets.constraints import NM, Filters, Projection, Unstructured, _scores_dtype, keep_count

__all__: list[str] = []  # internal: ADMM, Masks and hard pruning use it

try:  # DTensor lives in torch.distributed.tensor from torch 2.5
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - a build without distributed support
    DTensor, Shard = (), None


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's block of ``t`` (``t`` itself unless it is a DTensor); in-place changes to it
    change ``t``, and under autograd it is differentiable in ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class RowShards:
    """How a parameter's rows are split: this rank's place among ``size`` in ``group``."""

    group: dist.ProcessGroup
    rank: int
    size: int


def row_shards(p: torch.Tensor, name: str) -> RowShards | None:
    """The row sharding of ``p`` (FSDP2's ``Shard(0)`` on a 1-D mesh), or None when ``p`` is a
    plain tensor; any other placement is refused, naming the parameter."""
    if not isinstance(p, DTensor):
        return None
    mesh = p.device_mesh
    if mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(
            f"{name!r} is a DTensor placed {tuple(p.placements)} on a {mesh.ndim}-D mesh; ADMM "
            "handles FSDP2's row sharding (fully_shard: Shard(0) on one mesh dimension). Shard "
            "the model with fully_shard, or train it replicated (DDP)."
        )
    group = mesh.get_group()
    return RowShards(group, dist.get_rank(group), mesh.size())


def shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape of this rank's block of ``p``."""
    return tuple(local(p).shape)


def project(t, V: torch.Tensor, shards: RowShards):
    """``Π_S`` of ``t``'s set on this rank's block ``V`` of rows: on the block alone where the
    set acts row by row (N:M, per-row Unstructured) or expert by expert; by a top-k agreed
    across the ranks for a per-tensor Unstructured and for Filters."""
    c = t.constraint
    if t.experts or isinstance(c, NM) or (isinstance(c, Unstructured) and c.per_row):
        return t.project(V)
    if t.transposed:
        raise ValueError(
            f"{t.name!r} is stored [in, out] (transformers' Conv1D): FSDP2 shards its inputs, "
            f"so {c!r} cannot be projected shard by shard; keep it out of fully_shard or use DDP."
        )
    if isinstance(c, Unstructured):
        scores = _scores_dtype(V).detach().abs().flatten()
        n = sharded.total(scores.numel(), shards.group, V.device)
        mask = sharded.topk_mask(scores, keep_count(c.keep, n), shards.group, shards.rank)
        support = mask.view_as(V)
        return Projection(torch.where(support, V, 0), support)
    if isinstance(c, Filters):
        M = _scores_dtype(V).detach().reshape(V.shape[0], -1)
        n = sharded.total(M.shape[0], shards.group, V.device)
        rows = sharded.topk_mask(M.norm(dim=1), keep_count(c.keep, n), shards.group, shards.rank)
        support = rows.view(-1, *([1] * (V.ndim - 1))).expand_as(V)
        return Projection(V * support, support)
    raise ValueError(
        f"{t.name!r}: {c!r} on a parameter sharded by FSDP2 is not supported (its projection "
        "needs whole columns or the whole tensor); use Unstructured (per tensor or per_row), NM "
        "or Filters, or train under DDP."
    )


def check(sharding: dict, groups: bool, support: bool, metric) -> None:
    """What ADMM cannot take on FSDP2-sharded parameters, refused before any state is made."""
    names = [n for n, sh in sharding.items() if sh is not None]
    if not names:
        return
    if groups:
        raise ValueError(
            f"{names[0]!r} is sharded by FSDP2: coupled channel / head groups need whole "
            "parameters; use them with DDP or a single process."
        )
    if support:
        raise ValueError(
            f"{names[0]!r} is sharded by FSDP2: support= masks are not supported on sharded "
            "parameters; use DDP or a single process."
        )
    if isinstance(metric, str) and metric == "fisher":
        raise ValueError(
            f"{names[0]!r} is sharded by FSDP2, whose gradients bypass the hooks that accumulate "
            "the Fisher diagonal; use metric=optimizer (Adam's exp_avg_sq)."
        )
