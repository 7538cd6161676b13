"""Quantization sets for ADMM (ADMM-NN, ADMM-NN-S) and their Euclidean projections.

Each set is a :class:`~admmprune.Constraint` whose weights all lie on a few levels:

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
union over ``q``, and we take the ``q`` of least squared error exactly (:func:`best_scale`): with
levels ``q·m_k``, the error ``E(q) = Σ_i (|w_i| − q·m_{k_i(q)})²`` is a quadratic in ``q`` between
the breakpoints ``q = |w_i| / t_k`` (``t_k = (m_k + m_{k+1})/2``) where a weight changes level, so
its minimum is the best of the closed-form minimisers ``q* = Σ|w|m / Σm²`` of the pieces, clamped
to each piece; every ``q`` above ``max|w| / t_0`` zeroes every weight (the worst error). The
authors' grid scan around ``max|w|/L`` misses the best ``q`` by up to ~50 % more error.
``support`` is all-true: quantization constrains values, not positions.

Pruning and quantization together (ADMM-NN-S): prune first, then run :class:`~admmprune.ADMM`
with these sets and ``support=masks``, so only the kept weights are quantized and the zeros stay
zero (for ``Binary`` the kept weights are ``±a`` and the pruned ones 0).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from .constraints import Constraint, Projection, topk_mask

__all__ = [
    "Binary",
    "Quantized",
    "Ternary",
    "best_scale",
    "levels_for",
    "nearest_level",
]

#: breakpoints swept at once; more are swept in chunks of about this many (bounded memory)
_CHUNK = 1 << 21
#: most breakpoints swept in all (≈ 15 s on one CPU core); beyond, a window around the Lloyd q
_MAX_EXACT = 1 << 25
#: the coarse scan that seeds the Lloyd steps, in units of max|w| / m_L
_SEED = torch.linspace(0.05, 1.25, 25, dtype=torch.float64)


def best_scale(x: torch.Tensor, m: torch.Tensor, q_max: float | None = None) -> float:
    """The exact ``argmin_q Σ_i (|x_i| − q·m_{k_i(q)})²`` over ``q > 0``, levels ``q·m``.

    ``m``: sorted float64 ``[0, m_1, …, m_L]``; ``k_i(q)`` is the nearest level (the lower one on a
    tie). A few Lloyd steps give an upper bound ``E_0``; two lower bounds on ``E(q)`` — the weights
    rounded to zero, ``Σ_{|x| ≤ q·t_0} x²``, and the saturated ones,
    ``Σ_{|x| > q·m_L} (|x| − q·m_L)²`` — bracket every ``q`` that can beat it. Inside the bracket
    the breakpoints are swept in increasing ``u = 1/q`` (chunked, each chunk's start state computed
    directly), with ``S_am = Σ |x|·m_k`` and ``S_mm = Σ m_k²`` as running sums: on each piece
    ``E = Σ x² − 2q·S_am + q²·S_mm``, minimised in closed form.

    Exact whenever the bracket holds at most ``_MAX_EXACT`` (2^25) breakpoints, about ``n·L``: e.g.
    every layer up to 8 bits with 250 k weights, up to 4 bits with 4 M. Beyond, the sweep covers
    a window of that many breakpoints around the Lloyd fixed point: exact inside it, the best
    ``q`` unless it lies outside (tested: with the budget forced down to 1/20 of the breakpoints,
    the error stays within 1e-6 of the exact one). ``q_max``: a bound the caller knows the
    minimum to be attained under (pow2 levels). Returns 0.0 when ``x`` is all zero.
    """
    a = x.detach().flatten().double().abs()
    a = a[a > 0].sort().values
    if a.numel() == 0:
        return 0.0
    m = m.to(a.device)
    t = (m[1:] + m[:-1]) / 2
    dm, dmm = m[1:] - m[:-1], m[1:].pow(2) - m[:-1].pow(2)
    saa = float(a.pow(2).sum())
    seeds = [_error(a, m, t, float(q))[0] for q in _SEED * (float(a[-1]) / float(m[-1]))]
    best_q = float(_SEED[seeds.index(min(seeds))]) * float(a[-1]) / float(m[-1])
    best_q, best_e = _lloyd(a, m, t, best_q)
    if q_max is not None:  # the caller knows the minimum is attained at some q <= q_max
        while best_q > q_max:  # (for pow2 levels halving q never increases the error)
            best_q /= 2
        best_e = min(best_e, _error(a, m, t, best_q)[0])
    u_lo, u_hi = _bracket(a, m, t, best_e)
    if q_max is not None:
        u_lo = max(u_lo, 1.0 / q_max)
    u_lo, u_hi = _window(a, t, u_lo, u_hi, 1.0 / best_q)
    bounds = [u_lo, *_chunk_bounds(a, t, u_lo, u_hi), u_hi]
    for u1, u2 in itertools.pairwise(bounds):
        e, q = _sweep(a, m, t, dm, dmm, saa, u1, u2)
        if e < best_e:
            best_e, best_q = e, q
    return best_q


def _count(a: torch.Tensor, t: torch.Tensor, u_lo: float, u_hi: float) -> int:
    """How many breakpoints ``u = t_k / |x_i|`` lie in ``[u_lo, u_hi)``."""
    hi = torch.searchsorted(t, a * u_hi) if u_hi < float("inf") else torch.full_like(a, t.numel())
    return int((hi - torch.searchsorted(t, a * u_lo)).sum())


def _window(a, t, u_lo: float, u_hi: float, u0: float) -> tuple[float, float]:
    """The bracket, narrowed around ``u0`` to ``[u0/(1+r), u0·(1+r)]`` when it holds more than
    ``_MAX_EXACT`` breakpoints (high bit widths on large layers); ``r`` by bisection."""
    if _count(a, t, u_lo, u_hi) <= _MAX_EXACT:
        return u_lo, u_hi
    lo, hi = 0.0, 1.0
    while _count(a, t, max(u_lo, u0 / (1 + hi)), min(u_hi, u0 * (1 + hi))) <= _MAX_EXACT:
        lo, hi = hi, 2 * hi
    for _ in range(30):
        mid = (lo + hi) / 2
        inside = _count(a, t, max(u_lo, u0 / (1 + mid)), min(u_hi, u0 * (1 + mid)))
        lo, hi = (mid, hi) if inside <= _MAX_EXACT else (lo, mid)
    return max(u_lo, u0 / (1 + lo)), min(u_hi, u0 * (1 + lo))


def _error(a: torch.Tensor, m: torch.Tensor, t: torch.Tensor, q: float) -> tuple[float, float]:
    """``E(q)`` and the closed-form ``q*`` of ``q``'s assignment (a Lloyd step)."""
    mk = m[torch.searchsorted(t * q, a)]
    smm = float(mk.pow(2).sum())
    e = float((a - q * mk).pow(2).sum())
    return e, (float((a * mk).sum()) / smm if smm > 0 else q)


def _lloyd(a, m, t, q: float, steps: int = 8) -> tuple[float, float]:
    """Alternate nearest levels and the least-squares ``q`` (never increases the error)."""
    e, nxt = _error(a, m, t, q)
    for _ in range(steps):
        e2, nxt2 = _error(a, m, t, nxt)
        if e2 >= e:
            break
        q, e, nxt = nxt, e2, nxt2
    return q, e


def _bracket(a, m, t, ub: float) -> tuple[float, float]:
    """``[u_lo, u_hi]`` in ``u = 1/q`` outside which ``E(q) ≥ ub`` provably (``a`` sorted)."""
    zeroed = torch.cumsum(a.pow(2), 0)  # weights at or under q·t_0 round to zero
    j = int(torch.searchsorted(zeroed, zeroed.new_tensor([ub]), right=True))
    u_lo = float(t[0]) / float(a[j]) if j < a.numel() else 0.0
    top = float(m[-1])

    def saturated(q: float) -> float:
        return float((a - q * top).clamp_min(0).pow(2).sum())

    lo, hi = 0.0, float(a[-1]) / top  # saturated(hi) = 0 ≤ ub
    if saturated(lo) <= ub:
        return u_lo, float("inf")
    for _ in range(64):  # bisection for the least q with saturated(q) ≤ ub
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if saturated(mid) <= ub else (mid, hi)
    return u_lo, 1.0 / lo if lo > 0 else float("inf")


def _chunk_bounds(a: torch.Tensor, t: torch.Tensor, u_lo: float, u_hi: float) -> list[float]:
    """Inner chunk boundaries in ``(u_lo, u_hi)``, about ``_CHUNK`` breakpoints per chunk, at
    quantiles of the breakpoints of an evenly spaced subsample of the (sorted) weights."""
    chunks = -(-_count(a, t, u_lo, u_hi) // _CHUNK)
    if chunks <= 1:
        return []
    u = (t.reshape(1, -1) / a[::chunks].reshape(-1, 1)).flatten()
    u = u[(u > u_lo) & (u < u_hi)].sort().values
    if u.numel() == 0:
        return []
    idx = torch.linspace(0, u.numel() - 1, chunks + 1)[1:-1].long()
    return sorted(set(u[idx].tolist()))


def _sweep(a, m, t, dm, dmm, saa: float, u1: float, u2: float) -> tuple[float, float]:
    """The least error and its ``q`` over ``u = 1/q`` in ``[u1, u2]``."""
    k0 = torch.searchsorted(t, a * u1)  # levels at u1: thresholds t_k < |x|·u1 are passed
    k1 = torch.searchsorted(t, a * u2) if u2 < float("inf") else torch.full_like(k0, t.numel())
    sam0, smm0 = float((a * m[k0]).sum()), float(m[k0].pow(2).sum())
    count = k1 - k0
    total = int(count.sum())
    who = torch.repeat_interleave(torch.arange(a.numel(), device=a.device), count)
    start = torch.cumsum(count, 0) - count
    k = k0[who] + torch.arange(total, device=a.device) - start[who]
    u = t[k] / a[who]
    order = torch.argsort(u, stable=True)
    u, k, who = u[order], k[order], who[order]
    sam = torch.cat([a.new_tensor([sam0]), sam0 + torch.cumsum(a[who] * dm[k], 0)])
    smm = torch.cat([a.new_tensor([smm0]), smm0 + torch.cumsum(dmm[k], 0)])
    # piece j spans u in [edges[j], edges[j+1]], i.e. q in [1/edges[j+1], 1/edges[j]]
    edges = torch.cat([a.new_tensor([u1]), u, a.new_tensor([u2])])
    q_hi, q_lo = 1 / edges[:-1], 1 / edges[1:]
    live = smm > 0  # all weights on level 0: the error is Σx², never better than that
    q = torch.where(live, sam / smm.clamp_min(1e-300), 0.0)
    q = torch.minimum(torch.maximum(q, q_lo), q_hi)
    e = torch.where(live, saa - 2 * q * sam + q * q * smm, saa)
    j = int(torch.argmin(e))
    return float(e[j]), float(q[j])


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

    def multipliers(self) -> torch.Tensor:
        """The level magnitudes in units of ``q``, sorted: ``[0, m_1, …, m_L]`` (float64)."""
        return self.level_set(1.0, torch.float64)[self.L :]

    def error(self, x: torch.Tensor, q: float) -> float:
        """Squared projection error ``||x − Π_q(x)||²`` of ``x`` onto the levels of scale ``q``."""
        if q <= 0:
            return float(x.double().pow(2).sum())
        x = x.double()
        return float(
            (x - nearest_level(x, self.level_set(q, torch.float64, x.device))).pow(2).sum()
        )

    def scale(self, x: torch.Tensor) -> float:
        """The ``q`` with the least squared error, exactly (see :func:`best_scale`).

        pow2 levels are scale-free: while no weight reaches the top level (``max|x| <= 0.75q``),
        ``q/2`` keeps every level in use and adds one below, so it is at least as good; the
        smallest such q is returned (``q <= max|x| / 0.75``), not one with idle top levels.
        """
        top = float(x.abs().max()) if x.numel() else 0.0
        q_max = top / 0.75 if self.levels == "pow2" and self.L > 1 and top > 0 else None
        return best_scale(x, self.multipliers(), q_max)

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
