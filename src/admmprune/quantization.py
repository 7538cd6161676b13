"""Quantization sets for ADMM (ADMM-NN, ADMM-NN-S) and their Euclidean projections.

Each set is a :class:`~admmprune.constraints.Constraint` whose weights all lie on a few levels:

=====================  ============================================  ===========================
set                    levels                                        projection
=====================  ============================================  ===========================
``Quantized(M)``       ``{0, ±q, ±2q, …, ±L·q}``, ``L = 2^(M−1)−1``  nearest level; ``q`` by
                                                                     grid search (below)
``Quantized(M,         ``{0, ±q, ±q/2, …, ±q/2^(L−1)}``              nearest level; ``q`` by
"pow2")``                                                            grid search
``Ternary()``          ``{0, ±a}``, any ``a ≥ 0``                    exact: the ``k`` largest
                                                                     ``|w|`` become ``sign(w)·a``,
                                                                     ``a`` = their mean, ``k``
                                                                     maximising ``(Σ_k |w|)²/k``
``Binary()``           ``{±a}``, any ``a ≥ 0``                       exact: ``sign(w)·mean|w|``
=====================  ============================================  ===========================

For fixed ``q`` the nearest level is the exact projection. The set of an M-bit layer is the
union over ``q``; we pick ``q`` on a grid of ``GRID`` scales of ``max|w|`` (the authors' scan
around ``max|w|/L``) by the least squared error, so ``Quantized``'s projection is exact on the
grid. ``support`` is all-true: quantization constrains values, not positions.

Pruning and quantization together (ADMM-NN-S): prune first, then run :class:`~admmprune.ADMM`
with these sets and ``support=masks``, so only the kept weights are quantized and the zeros stay
zero (for ``Binary`` the kept weights are ``±a`` and the pruned ones 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .constraints import Constraint, Projection, topk_mask

__all__ = ["Binary", "Quantized", "Ternary", "nearest_level"]

#: scales of the q grid, as fractions of max|w| / L (uniform) or of max|w| (pow2)
GRID = torch.linspace(0.05, 1.25, 121, dtype=torch.float64)


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Each entry of ``x`` replaced by its nearest entry of sorted 1-D ``levels``.

    An entry exactly half-way between two levels goes to the lower one.
    """
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(x, mids)]


class _Levels(Constraint):
    """A set whose entries take values on a few levels: element-wise, any rank, no keep."""

    elementwise = True

    def with_keep(self, fn: Callable[[float], float]) -> Constraint:
        return self  # no kept fraction: a sparsity schedule leaves quantization as it is

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and repr(other) == repr(self)

    def __hash__(self) -> int:
        return hash(repr(self))


class Quantized(_Levels):
    """M-bit levels ``{0, ±q, …, ±(2^(M−1)−1)·q}`` (``levels="uniform"``) or the power-of-two
    levels ``{0, ±q·2^(−j) : j = 0…L−1}`` (``levels="pow2"``), ``q`` per layer and per update.

    Args:
        bits: M, 2 to 16 (for one bit use :class:`Binary`).
        levels: ``"uniform"`` or ``"pow2"``.
    """

    def __init__(self, bits: int, levels: str = "uniform") -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ValueError(
                f"Quantized(bits={bits!r}): bits must be an integer from 2 to 16 "
                "(2 bits = levels {0, ±q}); for one bit use Binary(), for {0, ±a} Ternary()."
            )
        if levels not in ("uniform", "pow2"):
            raise ValueError(
                f"Quantized(levels={levels!r}): use 'uniform' (q·i) or 'pow2' (q·2^-j)."
            )
        self.bits, self.levels = bits, levels
        self.L = 2 ** (bits - 1) - 1

    def __repr__(self) -> str:
        extra = "" if self.levels == "uniform" else f", levels={self.levels!r}"
        return f"Quantized(bits={self.bits}{extra})"

    def level_set(self, q: float, dtype=torch.float32, device=None) -> torch.Tensor:
        """The sorted levels for scale ``q``."""
        if self.levels == "uniform":
            mags = torch.arange(1, self.L + 1, dtype=torch.float64) * q
        else:
            mags = q * torch.pow(2.0, -torch.arange(self.L - 1, -1, -1, dtype=torch.float64))
        return torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags]).to(
            dtype=dtype, device=device
        )

    def candidates(self, x: torch.Tensor) -> torch.Tensor:
        """The grid of ``q`` searched for ``x``."""
        top = float(x.abs().max()) if x.numel() else 0.0
        base = top / self.L if self.levels == "uniform" else top
        return GRID * base

    def errors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared projection error of ``x`` for every candidate ``q``: ``(q, error)``."""
        qs = self.candidates(x)
        errs = torch.empty_like(qs)
        for i, q in enumerate(qs.tolist()):
            levels = self.level_set(q, x.dtype, x.device)
            errs[i] = float((x - nearest_level(x, levels)).pow(2).sum()) if q > 0 else 0.0
        return qs, errs

    def scale(self, x: torch.Tensor) -> float:
        """The ``q`` on the grid with the least squared error (the first one on ties)."""
        qs, errs = self.errors(x)
        return float(qs[int(torch.argmin(errs))])

    def project(self, W: torch.Tensor, groups: int = 1) -> Projection:
        x = W.detach().float()
        q = self.scale(x)
        support = torch.ones_like(W, dtype=torch.bool)
        if q == 0.0:  # all zero: already on every level set
            return Projection(torch.zeros_like(W), support)
        Z = nearest_level(x, self.level_set(q, torch.float32, W.device)).to(W.dtype)
        return Projection(Z, support)


class Ternary(_Levels):
    """Ternary weights ``{0, ±a}`` with ``a ≥ 0`` free per layer; the exact projection.

    With the ``k`` largest ``|w|`` kept, the best ``a`` is their mean and the error is
    ``||w||² − (Σ_k |w|)²/k``; we take the ``k`` that maximises ``(Σ_k |w|)²/k``.
    """

    def __repr__(self) -> str:
        return "Ternary()"

    def project(self, W: torch.Tensor, groups: int = 1) -> Projection:
        x = W.detach().float().flatten()
        support = torch.ones_like(W, dtype=torch.bool)
        mags = x.abs().sort(descending=True).values.double()
        csum = mags.cumsum(0)
        gain = csum.pow(2) / torch.arange(1, x.numel() + 1, dtype=torch.float64)
        k = int(torch.argmax(gain)) + 1
        if float(csum[-1]) == 0.0:
            return Projection(torch.zeros_like(W), support)
        a = float(csum[k - 1] / k)
        keep = topk_mask(x.abs(), k)
        Z = torch.where(keep, torch.sign(x) * a, 0.0).view_as(W).to(W.dtype)
        return Projection(Z, support)


class Binary(_Levels):
    """Binary weights ``{±a}`` with ``a ≥ 0`` free per layer; the exact projection
    ``Z = sign(W)·mean|W|`` (a zero goes to ``+a``)."""

    def __repr__(self) -> str:
        return "Binary()"

    def project(self, W: torch.Tensor, groups: int = 1) -> Projection:
        x = W.detach().float()
        a = x.abs().mean() if x.numel() else x.new_zeros(())
        Z = torch.where(x >= 0, a, -a).to(W.dtype)
        return Projection(Z, torch.ones_like(W, dtype=torch.bool))
