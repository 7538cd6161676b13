"""Constraint sets S and their Euclidean projections Π_S.

Every projection works on the *GEMM view* of a weight: a tensor of shape
``[out, in/groups, *kernel]`` (Conv1d/2d/3d) or ``[out, in]`` (Linear) is the matrix with
rows = output filters/neurons and columns = the flattened ``(in/groups, *kernel)`` positions.

A constraint is stated as the fraction ``keep`` of its structures that survive, ``0 < keep <= 1``.
The number kept out of ``n`` is ``k = max(1, floor(keep * n + 1/2))`` (round half up, never zero).

Π_S(W) = argmin_{Z in S} ||W - Z||_F. For the sets here it is analytical: keep the ``k``
structures (weights, rows, channels or columns) with the largest L2 norm and zero the rest.
Ties in norm are broken towards the lower flat index, so the result is deterministic on every
device. ``project`` returns the projected tensor ``Z`` and its boolean *support* (the positions
``Z`` may be non-zero on), both shaped like ``W``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = [
    "NM",
    "Channels",
    "Columns",
    "Constraint",
    "Filters",
    "Intersection",
    "Projection",
    "Unstructured",
]


class Projection(NamedTuple):
    """Result of a projection: ``Z = Π_S(W)`` and the boolean support of ``S`` chosen for ``W``."""

    Z: torch.Tensor
    support: torch.Tensor


def keep_count(keep: float, n: int) -> int:
    """Number of structures kept out of ``n``: ``max(1, floor(keep·n + 1/2))``."""
    return max(1, min(n, math.floor(keep * n + 0.5)))


_SAMPLE = 1 << 20  # sample size for the threshold bracket on large tensors
_BRACKET = 0.005  # quantile margin either side: > 10 standard errors at this sample size


def kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The exact ``k``-th largest value of a 1-D ``scores`` (``1 <= k <= n``).

    ``kthvalue`` is single-threaded on CPU. For large inputs we first bracket the answer with
    quantiles of a fixed-seed sample, count what lies above the bracket, and select exactly
    inside it; if the bracket misses (it practically never does) we fall back to the full
    ``kthvalue``. The answer is the same exact value either way.
    """
    n = scores.numel()
    if n > 4 * _SAMPLE:
        gen = torch.Generator().manual_seed(0)
        idx = torch.randint(0, n, (_SAMPLE,), generator=gen).to(scores.device)
        q = 1.0 - k / n
        bounds = torch.tensor([max(0.0, q - _BRACKET), min(1.0, q + _BRACKET)])
        lo, hi = torch.quantile(scores[idx].float(), bounds.to(scores.device)).to(scores.dtype)
        above = int(torch.count_nonzero(scores > hi))
        band = scores[(scores >= lo) & (scores <= hi)]
        need = k - above
        if 1 <= need <= band.numel():
            return band.kthvalue(band.numel() - need + 1).values
    return scores.kthvalue(n - k + 1).values


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of a 1-D ``scores``; ties go to lower indices.

    Exact count, no full sort, identical on CPU and GPU.
    """
    n = scores.numel()
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = kth_largest(scores, k)
    mask = scores > threshold
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:
        ties = (scores == threshold).nonzero().flatten()[:missing]
        mask[ties] = True
    return mask


def _check_keep(cls: str, keep: object) -> float:
    """Validate a kept fraction; the message says what ``keep`` means and how to fix it."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ValueError(
            f"{cls}(keep={keep!r}): keep must be a number, the fraction of structures kept "
            f"in (0, 1]; e.g. {cls}(keep=0.1) keeps 10 %."
        )
    keep = float(keep)
    if 0.0 < keep <= 1.0:
        return keep
    if 1.0 < keep <= 100.0:
        fix = f"if you meant {keep:g} %, write {cls}(keep={keep / 100:g})"
    elif keep <= 0.0:
        fix = "keep=0 would remove the whole layer: leave the layer out, or keep a small fraction"
    else:
        fix = f"e.g. {cls}(keep=0.1) keeps 10 %"
    raise ValueError(
        f"{cls}(keep={keep!r}): keep is the fraction of structures KEPT and must be in (0, 1]; "
        f"{fix}."
    )


class Constraint:
    """A set S of admissible weights with an analytical Euclidean projection.

    Subclasses implement :meth:`project`. ``a & b`` is the intersection of two constraints.
    """

    #: smallest tensor rank the constraint applies to (2 for the structured GEMM-view sets)
    min_ndim: int = 1
    #: whether the set constrains each entry on its own, so it can act on any subset of entries
    #: (``ADMM(..., support=masks)`` projects only the kept weights)
    elementwise: bool = False
    #: whether Π_S keeps W on a support it chooses, ranked by squared entries or group norms (a
    #: sparsity set): then it has an exact projection in any diagonal metric (sets/weighted.py)
    support_set: bool = False

    def project(self, W: torch.Tensor, groups: int = 1) -> Projection:
        """Return ``Π_S(W)`` and its support. ``groups`` is the conv's ``groups`` attribute."""
        raise NotImplementedError

    def check(self, W: torch.Tensor, layer: str, groups: int = 1) -> None:
        """Raise ``ValueError`` naming ``layer`` if this constraint cannot apply to ``W``."""
        if W.ndim < self.min_ndim:
            raise ValueError(
                f"{self!r} cannot constrain {layer!r} of shape {tuple(W.shape)}: it needs a weight "
                f"with at least {self.min_ndim} dimensions (Conv or Linear). Use Unstructured for "
                f"1-D parameters, or leave {layer!r} out of the spec."
            )

    def with_keep(self, fn: Callable[[float], float]) -> Constraint:
        """The same kind of constraint with every kept fraction ``keep`` replaced by ``fn(keep)``.

        Pruning schedules use it to approach a target gradually, e.g. ``lambda k: k ** 0.5``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no kept fraction to change.")

    def __and__(self, other: Constraint) -> Intersection:
        if not isinstance(other, Constraint):
            return NotImplemented
        return Intersection(self, other)


class _KeepFraction(Constraint):
    """A constraint parameterised by the kept fraction of some structures."""

    support_set = True

    def __init__(self, keep: float) -> None:
        self.keep = _check_keep(type(self).__name__, keep)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keep={self.keep:g})"

    def with_keep(self, fn: Callable[[float], float]) -> Constraint:
        return type(self)(min(1.0, fn(self.keep)))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.keep == self.keep

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.keep))


def _scores_dtype(W: torch.Tensor) -> torch.Tensor:
    # Norms in at least fp32: bf16/fp16 scores tie far too often.
    return W if W.dtype in (torch.float32, torch.float64) else W.float()


class Unstructured(_KeepFraction):
    """Non-structured sparsity: at most ``k`` non-zero weights.

    Π_S(W) keeps the ``k = keep·n`` entries of largest ``|w|`` and zeros the rest. With
    ``per_row=True`` the count holds in every GEMM row (output neuron / filter) instead: each
    row keeps its ``keep·row_length`` largest entries (the setting SparseGPT and Wanda report;
    ties to the lower index). A 1-D weight is one row.
    """

    elementwise = True

    def __init__(self, keep: float, per_row: bool = False) -> None:
        super().__init__(keep)
        if not isinstance(per_row, bool):
            raise ValueError(f"Unstructured(per_row={per_row!r}): per_row is True or False.")
        self.per_row = per_row

    def project(self, W: torch.Tensor, groups: int = 1) -> Projection:
        if self.per_row and W.ndim >= 2:
            return self._project_rows(W)
        scores = _scores_dtype(W).detach().abs().flatten()
        support = topk_mask(scores, keep_count(self.keep, scores.numel())).view_as(W)
        return Projection(torch.where(support, W, 0), support)

    def _project_rows(self, W: torch.Tensor) -> Projection:
        scores = _scores_dtype(W).detach().abs().reshape(W.shape[0], -1)
        k = keep_count(self.keep, scores.shape[1])
        # a stable descending sort puts equal scores in index order: ties go to the lower index
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        support = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
        support = support.view_as(W)
        return Projection(torch.where(support, W, 0), support)

    def with_keep(self, fn: Callable[[float], float]) -> Constraint:
        return Unstructured(min(1.0, fn(self.keep)), self.per_row)

    def __repr__(self) -> str:
        return f"Unstructured(keep={self.keep:g}{', per_row=True' if self.per_row else ''})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unstructured) and (other.keep, other.per_row) == (
            self.keep,
            self.per_row,
        )

    def __hash__(self) -> int:
        return hash(("Unstructured", self.keep, self.per_row))


class Filters(_KeepFraction):
    """Filter-wise (row) sparsity: at most ``k`` non-zero rows of the GEMM view.

    Π_S(W) keeps the ``keep·out`` rows (output filters / neurons) of largest L2 norm.
    """

    min_ndim = 2

    def project(self, W: torch.Tensor, groups: int = 1) -> Projection:
        M = _scores_dtype(W).detach().reshape(W.shape[0], -1)
        rows = topk_mask(M.norm(dim=1), keep_count(self.keep, M.shape[0]))
        support = rows.view(-1, *([1] * (W.ndim - 1))).expand_as(W)
        return Projection(W * support, support)


class Columns(_KeepFraction):
    """Shape-wise (column) sparsity: at most ``k`` non-zero columns of the GEMM view.

    A column is one ``(in/groups, *kernel)`` position shared by all filters; Π_S(W) keeps the
    ``keep·n_columns`` columns of largest L2 norm. For Linear, columns are input neurons.
    """

    min_ndim = 2

    def project(self, W: torch.Tensor, groups: int = 1) -> Projection:
        M = _scores_dtype(W).detach().reshape(W.shape[0], -1)
        cols = topk_mask(M.norm(dim=0), keep_count(self.keep, M.shape[1]))
        support = cols.view(1, *W.shape[1:]).expand_as(W)
        return Projection(W * support, support)


class Channels(_KeepFraction):
    """Channel-wise sparsity: at most ``k`` input channels carry non-zero weights.

    Input channel ``c`` of a conv with ``groups`` groups is read by the filters of group
    ``g = c // (in/groups)`` through slice ``j = c % (in/groups)``: its weights are
    ``W[g·out/groups : (g+1)·out/groups, j, ...]``. Π_S(W) keeps the ``keep·in`` channels of
    largest L2 norm over those weights. For a depthwise conv a channel is one filter; for
    Linear a channel is an input neuron (a column).
    """

    min_ndim = 2

    def check(self, W: torch.Tensor, layer: str, groups: int = 1) -> None:
        super().check(W, layer, groups)
        if W.shape[0] % groups:
            raise ValueError(
                f"{self!r} on {layer!r}: {W.shape[0]} output channels do not split into "
                f"groups={groups}; pass the conv's own groups attribute."
            )

    def project(self, W: torch.Tensor, groups: int = 1) -> Projection:
        out, per_group = W.shape[0], W.shape[1]
        G = _scores_dtype(W).detach().reshape(groups, out // groups, per_group, -1)
        norms = G.pow(2).sum(dim=(1, 3)).sqrt().flatten()  # [groups * in/groups] = in
        chans = topk_mask(norms, keep_count(self.keep, norms.numel())).view(groups, 1, per_group, 1)
        support = chans.expand_as(G).reshape(W.shape)
        return Projection(W * support, support)


class NM(Constraint):
    """N:M (semi-structured) sparsity: at most ``n`` non-zero weights in every group of ``m``
    consecutive columns of each GEMM row (2:4 is what sparse tensor cores run).

    Π_S(W) keeps, in each group, the ``n`` entries of largest ``|w|`` (ties to the lower index)
    and zeros the rest: the groups are disjoint, so this is the exact projection. The GEMM row
    length (``in/groups · kernel``) must be a multiple of ``m``.
    """

    min_ndim = 2
    support_set = True

    def __init__(self, n: int, m: int) -> None:
        ints = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (n, m))
        if not ints or not 1 <= n <= m:
            raise ValueError(
                f"NM(n={n!r}, m={m!r}): keep n of every m consecutive weights, integers with "
                "1 <= n <= m, e.g. NM(2, 4)."
            )
        self.n, self.m = int(n), int(m)

    @property
    def keep(self) -> float:
        return self.n / self.m

    def check(self, W: torch.Tensor, layer: str, groups: int = 1) -> None:
        super().check(W, layer, groups)
        cols = W[0].numel()
        if cols % self.m:
            raise ValueError(
                f"{self!r} on {layer!r}: its GEMM rows have {cols} columns, not a multiple of "
                f"m={self.m}; use an m that divides {cols}, or leave {layer!r} out."
            )

    def project(self, W: torch.Tensor, groups: int = 1) -> Projection:
        scores = _scores_dtype(W).detach().abs().reshape(-1, self.m)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        support = torch.zeros_like(scores, dtype=torch.bool)
        support.scatter_(1, order[:, : self.n], True)
        support = support.view_as(W)
        return Projection(torch.where(support, W, 0), support)

    def with_keep(self, fn: Callable[[float], float]) -> Constraint:
        """``n`` follows the schedule ``fn`` of the kept fraction (never below this ``n``)."""
        n = min(self.m, max(self.n, math.floor(fn(self.keep) * self.m + 0.5)))
        return NM(n, self.m)

    def __repr__(self) -> str:
        return f"NM({self.n}, {self.m})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NM) and (other.n, other.m) == (self.n, self.m)

    def __hash__(self) -> int:
        return hash(("NM", self.n, self.m))


class Intersection(Constraint):
    """Intersection of constraints, e.g. ``Filters(0.5) & Columns(0.5)`` (SS-Auto's row+column).

    The exact projection onto an intersection of sparsity sets is combinatorial. As in the
    papers, we apply the projections in turn; we try the given order and its reverse and keep
    the result closer to ``W`` (ties: the given order). The result always lies in every set.
    """

    def __init__(self, *parts: Constraint) -> None:
        flat: list[Constraint] = []
        for part in parts:
            if not isinstance(part, Constraint):
                raise ValueError(f"Intersection takes constraints, got {part!r}.")
            flat.extend(part.parts if isinstance(part, Intersection) else [part])
        if len(flat) < 2:
            raise ValueError("Intersection needs at least two constraints.")
        self.parts = tuple(flat)
        self.min_ndim = max(p.min_ndim for p in flat)
        self.elementwise = all(p.elementwise for p in flat)
        self.support_set = all(p.support_set for p in flat)

    def check(self, W: torch.Tensor, layer: str, groups: int = 1) -> None:
        for part in self.parts:
            part.check(W, layer, groups)

    def with_keep(self, fn: Callable[[float], float]) -> Constraint:
        return Intersection(*(p.with_keep(fn) for p in self.parts))

    def _in_turn(self, W: torch.Tensor, order: tuple[Constraint, ...], groups: int) -> Projection:
        Z, support = W, torch.ones_like(W, dtype=torch.bool)
        for part in order:
            Z, s = part.project(Z, groups)
            support = support & s
        return Projection(Z, support)

    def project(self, W: torch.Tensor, groups: int = 1) -> Projection:
        kinds = {type(p) for p in self.parts}
        if len(self.parts) == 2 and kinds == {Filters, Columns}:
            return self._rows_and_columns(W)
        first = self._in_turn(W, self.parts, groups)
        second = self._in_turn(W, self.parts[::-1], groups)
        d1 = (W - first.Z).float().norm()
        d2 = (W - second.Z).float().norm()
        return second if d2 < d1 else first

    def _rows_and_columns(self, W: torch.Tensor) -> Projection:
        """Filters & Columns, both orders, without building either intermediate ``Z``: each
        is a row set ``R`` and a column set ``C``, and ``||W − Z||² = ||W||² − ||W_RC||²``,
        so the order that keeps more energy wins; only the result is materialised."""
        M = _scores_dtype(W).detach().reshape(W.shape[0], -1)
        rows_first = self.parts[0].__class__ is Filters
        f, c = self.parts if rows_first else self.parts[::-1]
        kr, kc = keep_count(f.keep, M.shape[0]), keep_count(c.keep, M.shape[1])
        # rows, then the columns of the kept rows
        R1 = topk_mask(M.norm(dim=1), kr)
        C1 = topk_mask(M[R1].norm(dim=0), kc)
        # columns, then the rows of the kept columns
        C2 = topk_mask(M.norm(dim=0), kc)
        R2 = topk_mask(M[:, C2].norm(dim=1), kr)
        kept1 = M[R1][:, C1].float().square().sum()
        kept2 = M[R2][:, C2].float().square().sum()
        if rows_first:  # ties: the given order
            R, C = (R2, C2) if kept2 > kept1 else (R1, C1)
        else:
            R, C = (R1, C1) if kept1 > kept2 else (R2, C2)
        support = (R[:, None] & C[None, :]).view(W.shape)
        return Projection(W * support, support)

    def __repr__(self) -> str:
        return " & ".join(repr(p) for p in self.parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Intersection) and other.parts == self.parts

    def __hash__(self) -> int:
        return hash(self.parts)
