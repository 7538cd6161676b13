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
from .masks import hold_fixed

__all__ = ["Binary", "MaskedMapping", "Quantized", "Ternary", "levels_for", "nearest_level"]

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
        gain = csum.pow(2) / torch.arange(1, x.numel() + 1, dtype=torch.float64, device=mags.device)
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


def levels_for(constraint: Constraint, x: torch.Tensor) -> torch.Tensor:
    """The sorted levels ``constraint`` projects ``x`` onto (``q`` or ``a`` fitted to ``x``)."""
    if isinstance(constraint, Quantized):
        return constraint.level_set(constraint.scale(x.float()), torch.float32, x.device)
    if isinstance(constraint, (Ternary, Binary)):
        a = float(constraint.project(x.float()).Z.abs().max()) if x.numel() else 0.0
        values = [-a, 0.0, a] if isinstance(constraint, Ternary) else [-a, a]
        return torch.tensor(values, dtype=torch.float32, device=x.device)
    raise ValueError(f"{constraint!r} is not a quantization set (Quantized, Ternary, Binary).")


class MaskedMapping:
    """The authors' quantized retraining: snap a growing share of the kept weights to their
    nearest level and freeze them, train the rest, until every weight is on a level.

    The levels of each layer are fitted once, to the kept weights at the start. Each
    :meth:`step` freezes ``share`` more of each layer's kept weights (those closest to a level
    first); frozen weights keep their level exactly under any optimizer (their gradient is zeroed
    and their value restored after every step); :meth:`finish` snaps the rest.

    Args:
        model: the pruned model.
        spec: ``{name, glob or module type: Quantized | Ternary | Binary}``.
        support: the pruning masks; pruned weights stay zero and are not counted.
        share: fraction of the kept weights frozen per step (0.3: done after 4 steps).
    """

    def __init__(self, model, spec, *, support=None, share: float = 0.3) -> None:
        from .select import select

        if not 0 < share <= 1:
            raise ValueError(f"MaskedMapping(share={share!r}): a fraction in (0, 1], e.g. 0.3.")
        self.model, self.share, self.steps = model, share, 0
        self.targets = select(model, spec)
        self.levels, self.kept, self.frozen = {}, {}, {}
        with torch.no_grad():
            for t in self.targets:
                W = t.param.detach()
                kept = (
                    support[t.name].to(W.device).bool()
                    if support is not None and t.name in support
                    else torch.ones_like(W, dtype=torch.bool)
                )
                self.kept[t.name] = kept
                self.levels[t.name] = levels_for(t.constraint, W[kept])
                self.frozen[t.name] = torch.zeros_like(kept)
        self._values: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _snapped(self, t) -> torch.Tensor:
        W = t.param.detach().float()
        return torch.where(self.kept[t.name], nearest_level(W, self.levels[t.name]), 0.0)

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Freeze ``share`` more of each layer's kept weights; returns the frozen fraction."""
        self.steps += 1
        out = {}
        for t in self.targets:
            kept, frozen = self.kept[t.name], self.frozen[t.name]
            target = min(int(kept.sum()), round(self.steps * self.share * int(kept.sum())))
            S = self._snapped(t)
            err = (t.param.detach().float() - S).abs()
            err[~kept | frozen] = float("inf")  # candidates: kept and not yet frozen
            more = target - int(frozen.sum())
            if more > 0:
                idx = torch.topk(err.flatten(), more, largest=False, sorted=False).indices
                frozen.view(-1)[idx] = True
            t.param.copy_(torch.where(frozen, S.to(t.param.dtype), t.param))
            self._values[t.name] = t.param.detach().clone()
            out[t.name] = float(frozen.sum()) / max(1, int(kept.sum()))
        return out

    @torch.no_grad()
    def _restore(self) -> None:
        for t in self.targets:
            if t.name in self._values:
                t.param.copy_(torch.where(self.frozen[t.name], self._values[t.name], t.param))

    def attach(self, *optimizers: torch.optim.Optimizer) -> MaskedMapping:
        """Keep frozen weights on their level while ``optimizers`` train the model."""
        fixed = [(t.param, self.frozen[t.name]) for t in self.targets]
        self._handles += hold_fixed(fixed, optimizers, self._restore)
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def finish(self) -> None:
        """Snap every kept weight to its level (pruned ones stay zero) and remove the hooks."""
        self.detach()
        for t in self.targets:
            t.param.copy_(self._snapped(t).to(t.param.dtype))
            self.frozen[t.name] = self.kept[t.name].clone()

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "levels": {k: v.cpu() for k, v in self.levels.items()},
            "frozen": {k: v.cpu() for k, v in self.frozen.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["levels"]) != set(self.levels):
            raise ValueError("MaskedMapping state is for other layers; resume with the same spec.")
        self.steps = int(state["steps"])
        for t in self.targets:
            self.levels[t.name] = state["levels"][t.name].to(t.param.device)
            self.frozen[t.name].copy_(state["frozen"][t.name])
            self._values[t.name] = t.param.detach().clone()
