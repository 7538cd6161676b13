r"""Top-k over a tensor split across ranks, equal to the single-process selection.

A per-tensor sparsity set keeps the ``k`` largest scores of the whole tensor (``|w|`` for
:class:`~admmprune.sets.constraints.Unstructured`, row norms for ``Filters``); under FSDP2 each
rank holds a block of them, in rank order. The exact ``k``-th largest score ``τ`` is found by
bisection on the scores' bit patterns (for non-negative IEEE floats the integer order of the
bits is the order of the values):

    τ = max { s : #{scores ≥ s} ≥ k },   each count an all-reduce over the ranks,

32 (fp32) or 64 (fp64) steps. Every rank keeps its scores ``> τ``; the ``k − #{> τ}`` ties at
``τ`` go to the lowest global indices, as :func:`~admmprune.sets.constraints.topk_mask` gives
them in one process, so the masks are the same bit for bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__: list[str] = []  # internal: weights/shards.py uses it

_BITS = {torch.float32: (torch.int32, 31), torch.float64: (torch.int64, 63)}


def total(n: int | float, group, device) -> int | float:
    """``n`` summed over the ranks of ``group`` (an int stays exact; a float in fp64)."""
    exact = isinstance(n, int)
    c = torch.tensor([n], dtype=torch.int64 if exact else torch.float64, device=device)
    dist.all_reduce(c, group=group)
    return int(c) if exact else float(c)


def kth_largest(scores: torch.Tensor, k: int, group) -> torch.Tensor:
    """The ``k``-th largest of the non-negative ``scores`` held by all ranks (1-D, fp32/64)."""
    ints, top = _BITS[scores.dtype]
    lo, hi = 0, (1 << top) - 1  # bits of 0.0 (k ≤ n: all ≥ it) and above +inf (none ≥ it)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        value = torch.tensor(mid, dtype=ints).view(scores.dtype).to(scores.device)
        if total(int(torch.count_nonzero(scores >= value)), group, scores.device) >= k:
            lo = mid
        else:
            hi = mid
    return torch.tensor(lo, dtype=ints).view(scores.dtype).to(scores.device)


def topk_mask(scores: torch.Tensor, k: int, group, rank: int) -> torch.Tensor:
    """This rank's part of the mask of the ``k`` largest scores over all ranks (ties to the
    lowest global index; the blocks are in rank order)."""
    if k >= total(scores.numel(), group, scores.device):
        return torch.ones_like(scores, dtype=torch.bool)
    tau = kth_largest(scores, k, group)
    mask = scores > tau
    missing = k - total(int(torch.count_nonzero(mask)), group, scores.device)
    ties = (scores == tau).nonzero().flatten()
    counts = [
        torch.zeros(1, dtype=torch.int64, device=scores.device)
        for _ in range(dist.get_world_size(group))
    ]
    dist.all_gather(
        counts, torch.tensor([ties.numel()], dtype=torch.int64, device=scores.device), group=group
    )
    before = sum(int(c) for c in counts[:rank])
    take = min(max(missing - before, 0), ties.numel())
    mask[ties[:take]] = True
    return mask
