r"""SS-Auto: soft row + column group sparsity by a primal–proximal split, with one global λ.

Instead of a hard budget per layer, penalise the group norms of an auxiliary ``Z`` on the GEMM
view (rows = filters / output neurons, columns = ``(in, kh, kw)`` positions / input neurons)::

    W^{k+1} = argmin_W f(W) + Σ_i rho/2 · ||W_i − Z_i^k||²          (your SGD steps)
    Z^{k+1} = prox_{(λ/rho)·R}(W^{k+1})                             (update())
    R(Z)    = Σ_rows c_r·||Z_r||₂ + Σ_cols c_c·||Z_c||₂

with group weights ``c = sqrt(group size · P_i) · rms(W_i)``: rows and columns, and layers of
different shapes and weight scales, are penalised on one scale (a group dies when its RMS
weight falls below λ/rho times its layer's), and with a MAC target (``by="macs"``) ``P_i`` is
the number of positions layer ``i`` applies each weight at, so a group's threshold grows with
the square root of its MACs — the rule "drop g when its relative squared norm is below μ ×
its MACs" that a MAC budget asks for (``P_i = 1`` for a weight target). Without ``P_i`` one
λ thins the layers where a weight is cheap (the deep, low-resolution ones) as hard as the
expensive ones: on CIFAR ResNet-20 it emptied ``layer3`` (measured, benchmarks/README.md).
With ``reweight=True`` each group weight is also divided by the group's norm at the previous
update (reweighted group lasso). There is no dual variable by default: ``W`` itself is never
shrunk, only pulled towards the sparse ``Z``.

**Dual variable** (``dual=True``): the same split solved by ADMM, with a scaled dual ``U``::

    Z^{k+1} = prox_{(λ/rho)·R}(W^{k+1} + U^k),   U^{k+1} = U^k + W^{k+1} − Z^{k+1}

and the W-step pulls towards ``Z − U``. ``U`` accumulates what ``W`` still holds on the dead
groups (on surviving ones, debiased, it stays 0), so the pull grows until ``W`` reaches ``Z``'s
support, as in hard ADMM; without it the pull on a dead group is ``rho·W`` alone, and a short
schedule ends with ``W`` far from ``Z`` (the model collapses at the hard prune). ``U`` is
rescaled by ``rho_k / rho_{k+1}`` when rho grows, as in :class:`admmprune.ADMM`.

**Debiasing** (``debias=True``, the default): the prox decides which groups die; the surviving
entries of ``Z`` are those of ``W`` (``Z = W`` on the kept rows × columns, 0 elsewhere) instead
of their soft-thresholded values. Without it the groups that barely survive are shrunk almost to
zero, ``W`` is pulled towards that shrunken ``Z``, and as rho grows the shrinkage compounds
update after update (group lasso's bias). ``debias=False`` is the plain ``Z = prox(W)``.

**BatchNorm** makes a conv's rows scale-free: shrinking a filter that a BatchNorm normalises does
not change the network until the filter is exactly zero, so the pull towards a dead row goes
unfelt. Given ``example_input``, each layer's BatchNorm (the one whose input is the layer's
output) is found, and its weight and bias entries of the rows ``Z`` kills join the penalty with
target 0 (``couple_bn``), as the BatchNorm entries of a coupled channel group do in StructADMM.

``min_keep`` puts a floor under every layer's rows and columns (where one λ would take a layer
below it, that layer's thresholds are scaled down by bisection); without one, a MAC target can
empty whole layers (on CIFAR ResNet-20 it removes every ``layer1`` conv).
Measured on CIFAR ResNet-20 (benchmarks/README.md, CPU short schedule): plain prox 66.1 %,
debiased 80.2 %, + BatchNorm coupling 81.2 %, + ``min_keep=0.3`` 85.9 %, + ``dual`` 84.6 %
(hard ADMM, uniform rates: 85.4 %).

**One group set** has a closed-form prox, group soft-thresholding:
``Z_g = max(0, 1 − τ_g/||V_g||)·V_g`` (:func:`group_soft_threshold`). **Rows and columns
overlap**, and the prox of their sum has no closed form; :func:`prox_rows_columns` computes it
with the Dykstra-like proximal splitting of Bauschke & Combettes (iterate the row prox and the
column prox with two correction terms; converges to the exact prox of the sum). Its last row
step's zero rows and last column step's zero columns are both applied, so every group the prox
kills is exactly zero.

**Automatic rates**: the user gives one global target, the fraction of constrained weights
(``by="weights"``) or of their MACs (``by="macs"``, positions × kept weights per layer) to keep.
At every :meth:`SSAuto.update` λ is found by bisection (in log scale): the largest λ whose prox
of the current weights keeps at least that fraction; the per-layer rates are whatever the single
λ leaves. Since groups of nearly equal norm die at the same λ (at initialisation, whole layers
do), the kept fraction can jump past the target; the survivors closest to dying (smallest
``||Z_g||/τ_g``) are then zeroed one at a time, so the target is met to within one group.
:meth:`SSAuto.prune` keeps exactly the rows × columns the last ``Z`` kept.

**Cost of an update**: the layers of one GEMM shape run as one batched Dykstra (each stops at
its own convergence); a layer that ``min_keep`` binds gets the largest λ that keeps its floor
once per update (to 1e-4), not a fresh bisection at every step of the search; the search starts
from the previous update's λ. The λ and supports are those of the per-layer path (tested, to
the search's 1e-4 in λ); the time is in benchmarks/README.md (``overhead.py``, part 3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from .admm import _proximal_penalty
from .constraints import Constraint, Projection
from .masks import Masks, check_finite, hard_prune
from .select import Key, Spec, select

__all__ = [
    "RowsColumns",
    "SSAuto",
    "SoftRowsColumns",
    "group_soft_threshold",
    "prox_rows_columns",
]

_FORMAT = "admmprune.SSAuto"


def group_soft_threshold(V: torch.Tensor, tau: torch.Tensor | float, dim: int) -> torch.Tensor:
    """``argmin_Z Σ_g τ_g·||Z_g|| + ½||Z − V||²`` for the groups along ``dim`` of a matrix
    (``dim=1``: each row is a group; ``dim=0``: each column). ``tau``: scalar or one per group."""
    tau = torch.as_tensor(tau, dtype=V.dtype, device=V.device)
    shape = list(V.shape)
    shape[dim] = 1
    return _shrink(V, tau.reshape(shape) if tau.ndim else tau, dim)


def _as_group(tau, V: torch.Tensor, dim: int) -> torch.Tensor:
    """``tau`` (a scalar, or one per group per matrix: ``[L, r]`` / ``[L, c]``) shaped as the
    group norms of the stack ``V[L, r, c]`` along ``dim``: ``[L, r, 1]`` / ``[L, 1, c]``, or
    ``[1, 1, 1]`` for a scalar."""
    tau = torch.as_tensor(tau, dtype=V.dtype, device=V.device)
    if not tau.ndim:
        return tau.reshape(1, 1, 1)
    return tau.unsqueeze(dim)


def _shrink(V: torch.Tensor, tau: torch.Tensor, dim: int) -> torch.Tensor:
    """``max(0, 1 − τ_g/||V_g||)·V_g`` for the groups along ``dim``, ``tau`` already shaped as
    the group norms (or 0-dim)."""
    # vector_norm over a strided dim is ~15x slower on CPU than summing squares there
    last = dim in (-1, V.ndim - 1)
    norms = V.norm(dim=dim, keepdim=True) if last else V.square().sum(dim, keepdim=True).sqrt_()
    scale = torch.div(tau, norms.clamp_min_(torch.finfo(V.dtype).tiny))
    return V * scale.neg_().add_(1).clamp_(min=0)


def prox_rows_columns(
    V: torch.Tensor, tau_rows, tau_cols, iters: int = 50
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``argmin_Z Σ_r τ_r||Z_r|| + Σ_c τ_c||Z_c|| + ½||Z − V||²`` for a matrix ``V``.

    Returns ``(Z, kept_rows, kept_cols)``; ``Z`` is exactly zero outside kept rows × columns.
    Dykstra stops early once an iteration moves no entry by more than ``1e-7·max|V|``.
    """
    as_batch = lambda tau: tau[None] if isinstance(tau, torch.Tensor) and tau.ndim else tau  # noqa: E731
    Z, rows, cols = _prox_batch(V[None], as_batch(tau_rows), as_batch(tau_cols), iters)
    return Z[0], rows[0], cols[0]


def _prox_batch(
    V: torch.Tensor, tau_rows, tau_cols, iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`prox_rows_columns` of a stack of matrices ``V[L, r, c]`` at once, each with its
    own thresholds (``[L, r]``, ``[L, c]`` or scalars) and its own stopping iteration: a matrix
    that has converged leaves the batch, so each one gets exactly the iterates it gets alone."""
    Z, Y = torch.empty_like(V), torch.empty_like(V)  # each matrix's last x and y
    idx = torch.arange(V.shape[0], device=V.device)  # the matrices still iterating
    # thresholds shaped once as the group norms ([L, r, 1] / [L, 1, c]): the loop runs tens of
    # small ops per iteration, so per-call reshapes and temporaries are a real share of it
    tr = _as_group(tau_rows, V, -1)
    tc = _as_group(tau_cols, V, -2)
    x, p, q = V, torch.zeros_like(V), torch.zeros_like(V)
    atol = 1e-7 * (V.abs().amax(dim=(1, 2)) + 1e-30)
    for k in range(iters):
        s = x + p
        y = _shrink(s, tr, -1)
        p = s.sub_(y)  # x + p − y
        t = y + q
        x_new = _shrink(t, tc, -2)
        q = t.sub_(x_new)  # y + q − x_new
        done = torch.sub(x_new, x).abs_().amax(dim=(1, 2)) <= atol
        x = x_new
        if k == iters - 1 or bool(done.all()):
            Z[idx], Y[idx] = x, y
            break
        if bool(done.any()):  # these stop here; the rest go on without them
            Z[idx[done]], Y[idx[done]] = x[done], y[done]
            keep = ~done
            idx, x, p, q, atol = idx[keep], x[keep], p[keep], q[keep], atol[keep]
            tr, tc = (t[keep] if t.shape[0] > 1 else t for t in (tr, tc))
    rows = Y.ne(0).any(dim=2)
    cols = Z.ne(0).any(dim=1)
    return Z * rows[:, :, None] * cols[:, None, :], rows, cols


def _prox_coupled(
    Vs: list[torch.Tensor],
    row_of: list[torch.Tensor],
    tau_rows: torch.Tensor,
    tau_cols: list[torch.Tensor | None],
    iters: int,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The row + column prox when rows are coupled across matrices: channel ``j`` is row
    ``row_of[m][j]`` of every ``Vs[m]``, one group ``(Z_m[row_of[m][j]])_m`` with threshold
    ``tau_rows[j]``; matrix ``m`` has column groups with ``tau_cols[m]`` (``None``: none)::

        argmin Σ_j τ_j·||(Z_m[r_m(j)])_m|| + Σ_m Σ_c τ_mc·||Z_m[:, c]|| + ½ Σ_m ||Z_m − V_m||²

    The matrices side by side, rows in channel order, are one matrix whose rows are the
    channels and whose columns are every member's (threshold 0 where a member has none): this
    is :func:`prox_rows_columns` of it. Returns ``(Zs, alive channels, their row norms)``."""
    V = torch.cat([Vm[r] for Vm, r in zip(Vs, row_of)], dim=1)
    tc = torch.cat(
        [
            torch.zeros(Vm.shape[1], device=V.device) if t is None else t
            for Vm, t in zip(Vs, tau_cols)
        ]
    )
    Z, alive, _ = _prox_batch(V[None], tau_rows[None], tc[None], iters)
    Z, alive = Z[0], alive[0]
    out, start = [], 0
    for Vm, r in zip(Vs, row_of):
        Zm = torch.empty_like(Vm)
        Zm[r] = Z[:, start : start + Vm.shape[1]]
        out.append(Zm)
        start += Vm.shape[1]
    return out, alive, Z.norm(dim=1)


@dataclass
class _Coupled:
    """Channels that every one of ``weights`` produces (a residual stream): ``(name, row of
    channel j)`` per Conv/Linear weight, ``targets`` the ones the spec selected (they also get
    column groups), ``followers`` the entries that die with a channel and are not targets:
    the other producer weights and, with ``couple_bn``, BatchNorm / bias entries."""

    key: str
    weights: list[tuple[str, torch.Tensor]]
    targets: list[str]
    followers: list[tuple[str, torch.Tensor]]


class RowsColumns(Constraint):
    """The support an :class:`SSAuto` run chose for one layer: given rows × columns of the GEMM
    view. Its projection keeps exactly those entries (used by the final hard prune)."""

    min_ndim = 2

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        self.rows, self.cols = rows.bool(), cols.bool()

    def project(self, W: torch.Tensor, groups: int = 1) -> Projection:
        mask = self.rows.to(W.device)[:, None] & self.cols.to(W.device)[None, :]
        support = mask.reshape(W.shape)
        return Projection(W * support, support)

    def __repr__(self) -> str:
        return f"RowsColumns(rows={int(self.rows.sum())}, cols={int(self.cols.sum())})"


class SSAuto:
    """SS-Auto's primal–proximal solver for the layers ``spec`` selects (the constraint values in
    ``spec`` are ignored: every selected Conv/Linear weight gets the row + column penalty).

    Args:
        model: the network, trained by your own loop (add :meth:`penalty` to the loss).
        spec: which weights: a list of names, globs and module types, or a spec dict as for
            :class:`admmprune.ADMM` (its values are ignored, ``None`` still leaves a layer out).
        target: the fraction of constrained weights (or MACs) to keep, in (0, 1].
        by: ``"weights"`` or ``"macs"`` (needs ``example_input`` to count positions).
        rho: the proximal weight; ``rho_growth`` multiplies it at every update.
        reweight: divide each group's weight by its norm at the previous update.
        debias: ``Z`` keeps ``W``'s values on the groups the prox keeps (see above); False: the
            plain prox, ``Z = prox(W)``.
        couple_bn: pull the BatchNorm entries of dead rows to zero too (needs ``example_input``
            to find each layer's BatchNorm; without it nothing is coupled).
        couple: the rows of layers whose outputs are coupled (a residual stream: the convs that
            feed one addition, the shortcut and the stem) are one group per channel, as
            :func:`admmprune.channel_groups` finds them, so every row SS-Auto kills is removed
            by :func:`admmprune.compact`; the members the spec leaves out join with their rows
            only. The kept MACs / weights count the compact model: a consumer's columns that
            read a dead channel count as removed. Needs ``example_input`` (else off).
        min_keep: every layer keeps at least this fraction of its rows and of its columns
            (its thresholds are scaled down where λ would take more; 0: only never empty).
        dual: keep a scaled dual ``U`` (ADMM on the soft problem, see above).
        iters: Dykstra iterations per prox.
    """

    mode = "penalty"  # the training loop adds penalty() to the loss

    def __init__(
        self,
        model: nn.Module,
        spec: Spec | Sequence[Key],
        *,
        target: float,
        by: str = "weights",
        example_input: torch.Tensor | None = None,
        rho: float = 1e-2,
        rho_growth: float = 1.0,
        reweight: bool = False,
        debias: bool = True,
        couple_bn: bool = True,
        couple: bool = True,
        min_keep: float = 0.0,
        dual: bool = False,
        iters: int = 50,
    ) -> None:
        if not (isinstance(target, (int, float)) and 0 < target <= 1):
            raise ValueError(
                f"SSAuto(target={target!r}): the fraction KEPT, in (0, 1]; e.g. 0.25 keeps 25 %."
            )
        if by not in ("weights", "macs"):
            raise ValueError(f"SSAuto(by={by!r}): use 'weights' or 'macs'.")
        if by == "macs" and example_input is None:
            raise ValueError("SSAuto(by='macs') needs example_input to count MACs per layer.")
        if not (rho > 0 and rho_growth > 0):
            raise ValueError("SSAuto: rho and rho_growth must be positive.")
        self.model, self.target, self.by = model, float(target), by
        self.rho, self.rho_growth, self.reweight, self.iters = rho, rho_growth, reweight, iters
        if not 0 <= min_keep <= 1:
            raise ValueError(f"SSAuto(min_keep={min_keep!r}): a fraction in [0, 1].")
        self.debias, self.min_keep, self.dual = debias, float(min_keep), bool(dual)
        if not isinstance(iters, int) or iters < 1:
            raise ValueError(f"SSAuto(iters={iters!r}): at least 1 Dykstra iteration.")
        keys = spec.items() if isinstance(spec, Mapping) else ((k, True) for k in spec)
        self.targets = select(model, {k: None if v is None else SoftRowsColumns() for k, v in keys})
        for t in self.targets:
            if t.param.ndim < 2:
                raise ValueError(
                    f"SSAuto: {t.name!r} has shape {tuple(t.param.shape)}; rows and columns need "
                    "a Conv or Linear weight. Leave it out of the spec."
                )
        self.positions = {t.name: 1 for t in self.targets}
        per_layer: dict[str, int] = {}
        if by == "macs":
            from .accounting import count

            per_layer = {c.name: c.positions for c in count(model, example_input)["layers"]}
            self.positions = {t.name: per_layer[t.module_name] for t in self.targets}
        # BatchNorm affine entries that follow a target layer: {their name: the layer's weight}
        self.bn: dict[str, str] = {}
        if couple_bn and example_input is not None:
            norms = _norm_after(model, {t.module_name for t in self.targets}, example_input)
            for t in self.targets:
                bn = norms.get(t.module_name)
                for attr in ("weight", "bias"):
                    if bn is not None and getattr(model.get_submodule(bn), attr) is not None:
                        self.bn[f"{bn}.{attr}"] = t.name
        self._by_name = {t.name: t for t in self.targets}
        self.units: list[_Coupled] = []
        self._unit_of: dict[str, _Coupled] = {}  # target -> its unit
        self._unit_by_key: dict[str, _Coupled] = {}
        self.alive: dict[str, torch.Tensor] = {}  # per unit: its channels the last update kept
        # (producer: a target or a unit key, row of channel j, consumer target, its GEMM
        # columns of channel j [n, k]): what compaction removes with a dead channel
        self._consumers: list[tuple[str, torch.Tensor, str, torch.Tensor]] = []
        self._follows: dict[str, tuple[str, torch.Tensor]] = {}  # follower: (unit, index of j)
        if couple and example_input is not None:
            self._couple(example_input, per_layer, couple_bn)
        floor = sum(self.positions[t.name] * math.prod(self._floor(t)) for t in self.targets) / sum(
            self.positions[t.name] * t.param.numel() for t in self.targets
        )
        if floor > self.target:
            raise ValueError(
                f"SSAuto(min_keep={min_keep:g}) alone keeps {floor:.1%} of the {by}, more than "
                f"target={self.target:g}: lower min_keep or raise the target."
            )
        self.lam = 0.0
        self.num_updates = 0
        # per update: the λ above which a layer sits at its min_keep floor, and its prox there
        self._floor_lam: dict[str, float] = {}
        self._floor_prox: dict[str, tuple] = {}
        self.Z: dict[str, torch.Tensor] = {}
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._prev_norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for t in self.targets:
                check_finite(t.param, t.name, "at SSAuto start")
                self.Z[t.name] = t.param.detach().float().clone()  # Z⁰ = W⁰: no pull at first
            for name in [*self.bn, *self._follows]:
                self.Z[name] = model.get_parameter(name).detach().float().clone()
        # the scaled dual (``dual=True``; none when off) and the pull target
        self.U = {name: torch.zeros_like(Z) for name, Z in self.Z.items()} if self.dual else {}
        self._set_targets()

    def _couple(self, example_input, per_layer: dict[str, int], couple_bn: bool) -> None:
        """Coupled row groups and the consumers of every target's channels (see ``couple``)."""
        from .groups import channel_groups

        try:
            groups = channel_groups(self.model, example_input, 1.0)
        except ValueError:  # no removable channel group: nothing is coupled
            return
        names = {t.name for t in self.targets}
        params = dict(self.model.named_parameters())
        for g in groups:
            dims = g.dims or (0,) * len(g.members)
            members = [
                (n, torch.tensor(idx))
                for (n, idx), d in zip(g.members, dims)
                if d == 0 and all(isinstance(i, int) for i in idx)
            ]
            if len(members) != len(g.members):  # e.g. heads, or Conv1D's [in, out]: not ours
                continue
            weights = [(n, r) for n, r in members if params[n].ndim >= 2]
            mine = [n for n, _ in weights if n in names]
            if not mine or any(len(r) != params[n].shape[0] for n, r in weights):
                continue
            if len(weights) > 1:  # a residual stream: one row group per channel
                key = f"group:{g.name}"
                followers = [(n, r) for n, r in members if n not in names]
                if not couple_bn:
                    followers = [(n, r) for n, r in followers if params[n].ndim >= 2]
                weights.sort(key=lambda w: w[0] not in names)  # targets first
                self.units.append(_Coupled(key, weights, mine, followers))
                for n, r in followers:
                    self._follows[n] = (key, r)
                for n in list(self.bn):  # its BatchNorms are followers of the unit now
                    if self.bn[n] in mine:
                        del self.bn[n]
                producer, row = key, torch.arange(g.n)
            else:
                producer, row = mine[0], weights[0][1]
            for c, idx in g.consumers:
                if c in names:
                    k = params[c][0, 0].numel()  # GEMM columns per input channel
                    cols = torch.tensor(idx)[:, None] * k + torch.arange(k)[None, :]
                    self._consumers.append((producer, row, c, cols))
        self._unit_of = {n: u for u in self.units for n in u.targets}
        self._unit_by_key = {u.key: u for u in self.units}
        for u in self.units:  # MAC weights of the members the spec left out
            for n, _ in u.weights:
                if n not in self.positions:
                    self.positions[n] = per_layer.get(n.removesuffix(".weight"), 1)

    def _set_targets(self) -> None:
        """``T = Z − U`` (``Z`` without ``dual``), what the W-step pulls towards; cached, since
        the penalty is computed at every training step."""
        self.T = {n: Z - self.U[n].to(Z.device) if self.dual else Z for n, Z in self.Z.items()}

    # the W-step ------------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor:
        """``Σ_i rho/2 · ||W_i − Z_i + U_i||²`` in fp32 (``U = 0`` without ``dual``; the coupled
        BatchNorm entries included), differentiable in W; add it to the loss."""
        params = [(t.name, t.param) for t in self.targets]
        params += [(name, self.model.get_parameter(name)) for name in [*self.bn, *self._follows]]
        Ts = [self.T[name].to(P.device) for name, P in params]
        return _proximal_penalty([P for _, P in params], Ts, self.rho)

    # the Z-step ------------------------------------------------------------------------------
    def _taus(self, t, M: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = M.shape
        # sqrt(group size) × the layer's RMS weight: one λ compares groups by their share
        # within their layer, not by the init scale (which shrinks with fan-in); × sqrt(P):
        # a group's MAC cost (see the module docstring)
        scale = (float(M.pow(2).mean().sqrt()) or 1.0) * math.sqrt(self.positions[t.name])
        c_r = torch.full((rows,), math.sqrt(cols) * scale, device=M.device)
        c_c = torch.full((cols,), math.sqrt(rows) * scale, device=M.device)
        if self.reweight and t.name in self._prev_norms:
            nr, nc = self._prev_norms[t.name]
            c_r = c_r / (nr + 1e-3 * float(nr.max() + 1e-12))
            c_c = c_c / (nc + 1e-3 * float(nc.max() + 1e-12))
        return lam / self.rho * c_r, lam / self.rho * c_c

    def _floor(self, t) -> tuple[int, int]:
        """The fewest rows and columns layer ``t`` keeps (``min_keep``; at least one of each)."""
        rows = t.param.shape[0]
        return tuple(max(1, math.ceil(self.min_keep * n)) for n in (rows, t.param.numel() // rows))

    def _V(self, name: str, P: torch.Tensor) -> torch.Tensor:
        """What the prox acts on: ``W + U`` (``W`` without ``dual``), fp32, P's shape."""
        V = P.detach().float()
        return V + self.U[name].to(V.device) if self.dual else V

    def _matrix(self, t) -> torch.Tensor:
        return self._V(t.name, t.param).reshape(t.param.shape[0], -1)

    def _keys(self) -> list[str]:
        """What one λ acts on together: each uncoupled target, and each coupled unit."""
        return [t.name for t in self.targets if t.name not in self._unit_of] + [
            u.key for u in self.units
        ]

    def _prox_at(self, lams: Mapping[str, float]) -> dict[str, dict]:
        """The prox of each key in ``lams`` at its own λ: ``{key: {target: (Z, rows, cols)}}``
        (a unit also gives ``{key: (alive channels, their norms)}``). Uncoupled layers of one
        GEMM shape run as one batched Dykstra (ResNet-20's 18 block convs are 5 shapes)."""
        by_shape: dict[tuple, list] = {}
        for t in self.targets:
            if t.name in lams:
                by_shape.setdefault((t.param.shape[0], t.param[0].numel()), []).append(t)
        out = {}
        for layers in by_shape.values():
            Ms, trs, tcs = [], [], []
            for t in layers:
                M = self._matrix(t)
                tr, tc = self._taus(t, M, lams[t.name])
                Ms.append(M), trs.append(tr), tcs.append(tc)
            Z, rows, cols = _prox_batch(
                torch.stack(Ms), torch.stack(trs), torch.stack(tcs), self.iters
            )
            for i, t in enumerate(layers):
                out[t.name] = {t.name: (Z[i], rows[i], cols[i])}
        for u in self.units:
            if u.key in lams:
                out[u.key] = self._prox_unit(u, lams[u.key])
        return out

    def _unit_matrices(self, u: _Coupled) -> list[torch.Tensor]:
        return [self._V(n, self.model.get_parameter(n)).reshape(len(r), -1) for n, r in u.weights]

    def _unit_tau(self, u: _Coupled, Ms: list[torch.Tensor], lam: float) -> torch.Tensor:
        """A channel's threshold: λ/rho × ``sqrt(Σ_m cols_m · P_m · rms_m²)``, the row weight of
        :meth:`_taus` summed in square over the members (what one row of each costs)."""
        c = math.sqrt(
            sum(
                M.shape[1] * self.positions[n] * (float(M.pow(2).mean()) or 1.0)
                for (n, _), M in zip(u.weights, Ms)
            )
        )
        tau = torch.full((len(u.weights[0][1]),), lam / self.rho * c, device=Ms[0].device)
        if self.reweight and u.key in self._prev_norms:
            norms = self._prev_norms[u.key][0]
            tau = tau / (norms + 1e-3 * float(norms.max() + 1e-12))
        return tau

    def _prox_unit(self, u: _Coupled, lam: float) -> dict:
        Ms = self._unit_matrices(u)
        targets = self._by_name
        tau_cols = [
            self._taus(targets[n], M, lam)[1] if n in targets else None
            for (n, _), M in zip(u.weights, Ms)
        ]
        rows_of = [r.to(Ms[0].device) for _, r in u.weights]
        Zs, alive, norms = _prox_coupled(
            Ms, rows_of, self._unit_tau(u, Ms, lam), tau_cols, self.iters
        )
        res = {u.key: (alive, norms)}
        for (n, r), Z in zip(u.weights, Zs):
            if n in targets:
                rows = torch.zeros(Z.shape[0], dtype=torch.bool, device=Z.device)
                rows[r] = alive
                res[n] = (Z, rows, Z.ne(0).any(0))
        return res

    def _meets_floor(self, res: Mapping) -> bool:
        """Whether every target in one key's prox keeps its min_keep rows and columns."""
        targets = self._by_name
        for n, (_, rows, cols) in ((n, v) for n, v in res.items() if n in targets):
            r_min, c_min = self._floor(targets[n])
            if rows.sum() < r_min or cols.sum() < c_min:
                return False
        return True

    def _keep_all(self, key: str) -> dict:
        """λ = 0: every weight kept."""
        targets = self._by_name
        names = self._unit_targets(key)
        res = {}
        for n in names:
            M = self._matrix(targets[n])
            res[n] = (M, M.ne(0).any(1), M.ne(0).any(0))
        if key in self._unit_by_key:
            n0 = len(self._unit_by_key[key].weights[0][1])
            res[key] = (torch.ones(n0, dtype=torch.bool), torch.full((n0,), math.inf))
        return res

    def _unit_targets(self, key: str) -> list[str]:
        """The targets one key's λ acts on: a unit's, or the one layer."""
        return self._unit_by_key[key].targets if key in self._unit_by_key else [key]

    def _find_floors(self, keys: list[str], lam: float) -> None:
        """For the keys (layers, units) that fall below ``min_keep`` at ``lam``: the largest λ
        at which each still keeps its floor (bisection in log λ to 1e-4, all of them at once)
        and its prox there. A layer's thresholds scale with λ, so this λ does not depend on the
        global one: found once per update, it caps the layer's λ at every later step of the
        search."""
        hi = dict.fromkeys(keys, lam)
        lo = dict.fromkeys(keys, lam / 10)
        pending = set(keys)
        while pending:  # step down until each keeps its floor (a tiny λ keeps everything)
            proxed = self._prox_at({n: lo[n] for n in pending})
            for n in sorted(pending):
                if self._meets_floor(proxed[n]):
                    self._floor_prox[n] = proxed[n]
                    pending.discard(n)
                elif lo[n] < 1e-30 * lam:  # nothing but λ = 0 keeps it: keep every weight
                    lo[n], self._floor_prox[n] = 0.0, self._keep_all(n)
                    pending.discard(n)
                else:
                    hi[n], lo[n] = lo[n], lo[n] / 10
        pending = {n for n in keys if lo[n] > 0}
        while pending:
            mid = {n: math.sqrt(lo[n] * hi[n]) for n in pending}
            proxed = self._prox_at(mid)
            for n, m in mid.items():
                if self._meets_floor(proxed[n]):
                    lo[n], self._floor_prox[n] = m, proxed[n]
                else:
                    hi[n] = m
            pending = {n for n in pending if hi[n] / lo[n] >= 1 + 1e-4}
        self._floor_lam.update({n: lo[n] for n in keys})

    def _prox_all(self, lam: float) -> dict:
        """Every layer's prox at ``lam``, or, where that would take it below ``min_keep``, at the
        largest λ that keeps its floor (:meth:`_find_floors`): ``{target: (Z, rows, cols)}``
        and ``{unit key: (alive channels, norms)}``."""
        keys = self._keys()
        capped = {n for n, cap in self._floor_lam.items() if lam >= cap}
        by_key = self._prox_at({n: lam for n in keys if n not in capped})
        by_key.update({n: self._floor_prox[n] for n in capped})
        if self.min_keep:
            short = [n for n in keys if n not in capped and not self._meets_floor(by_key[n])]
            if short:
                self._find_floors(short, lam)
                by_key.update({n: self._floor_prox[n] for n in short})
        return {n: v for res in by_key.values() for n, v in res.items()}

    def _dead_inputs(self, rows: Mapping, cols: Mapping) -> dict[str, torch.Tensor]:
        """Per target, its GEMM columns that read a dead channel (compaction removes them)."""
        dead_in = {n: torch.zeros_like(c) for n, c in cols.items()}
        for producer, row, consumer, ccols in self._consumers:
            dead = ~rows[producer].to(row.device)[row]
            dead_in[consumer][ccols[dead].flatten().to(dead_in[consumer].device)] = True
        return dead_in

    def _kept_count(self, rows: Mapping, cols: Mapping) -> float:
        """Σ positions × kept rows × kept columns over the targets, a consumer's columns that
        read a dead channel (one compaction removes) not counted."""
        dead_in = self._dead_inputs(rows, cols)
        return sum(
            self.positions[n] * int(rows[n].sum()) * int((cols[n] & ~dead_in[n]).sum())
            for n in self._by_name
        )

    def _total(self) -> float:
        return sum(self.positions[t.name] * t.param.numel() for t in self.targets)

    def _masks_of(self, proxed: Mapping) -> tuple[dict, dict]:
        rows = {n: v[1] for n, v in proxed.items() if len(v) == 3}
        cols = {n: v[2] for n, v in proxed.items() if len(v) == 3}
        rows.update({n: v[0] for n, v in proxed.items() if len(v) == 2})  # unit: alive
        return rows, cols

    def _kept_fraction(self, proxed: Mapping) -> float:
        return self._kept_count(*self._masks_of(proxed)) / self._total()

    def search(self, iters: int = 30) -> float:
        """The largest λ whose prox of the current weights still keeps at least ``target``
        (bisection in log λ to 1e-4). The bracket starts at the last update's λ (the weights
        move little between updates), stepping by 2; on the first update from 1e-6 by 10."""
        fits = lambda lam: self._kept_fraction(self._prox_all(lam)) >= self.target  # noqa: E731
        start, step = (self.lam, 2.0) if self.lam > 0 else (1e-6, 10.0)
        if fits(start):
            lo, hi = start, start * step
            while fits(hi):
                lo, hi = hi, hi * step
                if hi > 1e12:
                    if self.min_keep:
                        return lo  # the floors bind everywhere: trimming takes the rest
                    raise RuntimeError("SSAuto: no λ reaches the target; is every weight zero?")
        else:
            lo, hi = start / step, start
            while not fits(lo):
                lo, hi = lo / step, lo
                if lo < 1e-30:
                    lo = 0.0
                    break
        for _ in range(iters):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 10
            if fits(mid):
                lo = mid
            else:
                hi = mid
            if lo > 0 and hi / lo < 1 + 1e-4:
                break
        return lo

    def _trim(self, proxed: dict, lam: float) -> dict:
        """Zero the surviving groups closest to dying (smallest ``||Z_g|| / τ_g``), one at a time,
        while that brings the kept fraction closer to the target. A row (or a unit's channel)
        also takes its consumers' columns of that channel off the count, as compaction does."""
        weight = self.positions
        goal = self.target * self._total()
        targets = self._by_name
        rows, cols = ({n: m.clone() for n, m in masks.items()} for masks in self._masks_of(proxed))
        dead_in = self._dead_inputs(rows, cols)
        rows_n = {n: int(rows[n].sum()) for n in targets}
        eff_n = {n: int((cols[n] & ~dead_in[n]).sum()) for n in targets}
        kept = sum(weight[n] * rows_n[n] * eff_n[n] for n in targets)
        floors = {n: self._floor(t) for n, t in targets.items()}
        by_producer: dict[str, list] = {}
        for producer, row, consumer, ccols in self._consumers:
            inverse = torch.empty_like(row)  # row index -> channel
            inverse[row] = torch.arange(len(row))
            by_producer.setdefault(producer, []).append((inverse, consumer, ccols))

        candidates = []
        for t in self.targets:
            Z, alive_rows, alive_cols = proxed[t.name]
            tr, tc = self._taus(t, self._matrix(t), lam)
            groups = [(1, alive_cols, Z.norm(dim=0), tc)]
            if t.name not in self._unit_of:
                groups.insert(0, (0, alive_rows, Z.norm(dim=1), tr))
            for axis, alive, norms, tau in groups:
                for i in alive.nonzero().flatten().tolist():
                    candidates.append((float(norms[i] / tau[i]), t.name, axis, i))
        for u in self.units:
            alive, norms = proxed[u.key]
            tau = self._unit_tau(u, self._unit_matrices(u), lam)
            for j in alive.nonzero().flatten().tolist():
                candidates.append((float(norms[j] / tau[j]), u.key, 2, j))
        candidates.sort()

        def killed_columns(producer: str, i: int):
            """Each consumer's live columns that channel (row) ``i`` of ``producer`` feeds."""
            for inverse, consumer, ccols in by_producer.get(producer, ()):
                c = ccols[int(inverse[i])].to(cols[consumer].device)
                yield consumer, c[cols[consumer][c] & ~dead_in[consumer][c]]

        for _, name, axis, i in candidates:
            if axis == 1:
                live = not bool(dead_in[name][i])
                lose, members = weight[name] * rows_n[name] * live, [name]
            else:
                members = self._unit_targets(name)
                lose = sum(weight[n] * eff_n[n] for n in members)
                lose += sum(weight[c] * rows_n[c] * len(k) for c, k in killed_columns(name, i))
            if abs(kept - lose - goal) >= abs(kept - goal):
                break
            if axis == 1 and int(cols[name].sum()) <= floors[name][1]:
                continue  # never below min_keep, never an empty layer
            if axis != 1 and any(rows_n[n] <= floors[n][0] for n in members):
                continue
            kept -= lose
            if axis == 1:
                cols[name][i] = False
                eff_n[name] -= live
                continue
            for c, k in list(killed_columns(name, i)):
                dead_in[c][k] = True
                eff_n[c] -= len(k)
            if axis == 2:
                rows[name][i] = False
                for n, r in self._unit_by_key[name].weights:
                    if n in targets:
                        rows[n][int(r[i])] = False
                        rows_n[n] -= 1
            else:
                rows[name][i] = False
                rows_n[name] -= 1
        out = dict(proxed)
        for n in targets:
            Z = proxed[n][0]
            out[n] = (Z * rows[n][:, None] * cols[n][None, :], rows[n], cols[n])
        for u in self.units:
            out[u.key] = (rows[u.key], proxed[u.key][1])
        return out

    @torch.no_grad()
    def update(self) -> dict:
        """Find λ for the target, then ``Z ← prox(W)``; returns λ, rho, kept, per-layer rates."""
        for t in self.targets:
            check_finite(t.param, t.name, f"at SSAuto update {self.num_updates + 1}")
        self._floor_lam, self._floor_prox = {}, {}  # the weights moved since the last update
        self.lam = self.search()
        # kept(λ) moves in steps, and groups of nearly equal norm die together; trimming the
        # weakest survivors meets the target to within one group.
        proxed = self._trim(self._prox_all(self.lam), self.lam)
        layers = {}
        for t in self.targets:
            Z, rows, cols = proxed[t.name]
            if self.debias:
                Z = self._matrix(t) * rows[:, None] * cols[None, :]
            Z = Z.reshape(t.param.shape)
            dual = self.rho * float((Z - self.Z[t.name].to(Z.device)).norm())
            self.Z[t.name] = Z
            self.kept[t.name] = (rows, cols)
            if self.reweight:
                M = t.param.detach().float().reshape(t.param.shape[0], -1)
                self._prev_norms[t.name] = (M.norm(dim=1), M.norm(dim=0))
            layers[t.name] = {
                "rows": int(rows.sum()) / rows.numel(),
                "cols": int(cols.sum()) / cols.numel(),
                "kept": int(rows.sum()) * int(cols.sum()) / t.param.numel(),
                "primal": float((t.param.detach().float() - self.Z[t.name]).norm()),
                "dual": dual,
            }
        for name, layer in self.bn.items():  # a dead row's BatchNorm entries fade with it
            V = self._V(name, self.model.get_parameter(name))
            self.Z[name] = V * self.kept[layer][0].to(V.device)
        self.alive = {u.key: proxed[u.key][0] for u in self.units}
        for name in self._follows:  # and so does everything else that writes a dead channel
            V = self._V(name, self.model.get_parameter(name))
            self.Z[name] = V * self._follower_mask(name).to(V.device)
        if self.reweight:
            for u in self.units:
                Ms = [
                    self.model.get_parameter(n).detach().float().reshape(len(r), -1)
                    for n, r in u.weights
                ]
                sq = sum(M.square().sum(1)[r.to(M.device)] for M, (_, r) in zip(Ms, u.weights))
                self._prev_norms[u.key] = (sq.sqrt(), torch.zeros(0))
        grow = self.rho_growth
        for name, U in self.U.items():  # U += W − Z, rescaled for the next rho
            W = self.model.get_parameter(name).detach().float()
            self.U[name] = (U.to(W.device) + W - self.Z[name].to(W.device)) / grow
        self._set_targets()
        stats = {
            "lambda": self.lam,
            "rho": self.rho,
            "kept": self._kept_fraction(proxed),
            "layers": layers,
        }
        self.rho *= grow
        self.num_updates += 1
        return stats

    def _follower_mask(self, name: str) -> torch.Tensor:
        """Which entries of follower ``name`` live: the rows of its unit's alive channels."""
        key, idx = self._follows[name]
        P = self.model.get_parameter(name)
        rows = torch.zeros(P.shape[0], dtype=torch.bool)
        rows[idx] = self.alive[key].cpu()
        return rows.reshape(-1, *[1] * (P.ndim - 1)).expand(P.shape)

    def rates(self) -> dict[str, float]:
        """Kept fraction per layer that the last update chose."""
        return {
            n: int(r.sum()) * int(c.sum()) / (r.numel() * c.numel())
            for n, (r, c) in self.kept.items()
        }

    @torch.no_grad()
    def prune(self) -> Masks:
        """Hard prune to the rows × columns the last ``Z`` kept (an update first if none ran)."""
        if not self.kept:
            self.update()
        chosen = [replace(t, constraint=RowsColumns(*self.kept[t.name])) for t in self.targets]
        masks = hard_prune(self.model, chosen)
        # what else writes a dead channel (a unit's other producers, BatchNorm entries) is
        # zeroed too, so that compact() removes the channel
        extra = {n: self._follower_mask(n) for n in self._follows}
        for name, layer in self.bn.items():
            P = self.model.get_parameter(name)
            extra[name] = self.kept[layer][0].to(P.device).reshape(P.shape)
        if not extra:
            return masks
        for name, mask in extra.items():
            P = self.model.get_parameter(name)
            P.mul_(mask.to(P.device, P.dtype))
        return Masks(self.model, {**dict(masks), **extra})

    def close(self) -> None:
        """Nothing to remove (no hooks); for the same interface as :class:`admmprune.ADMM`."""

    # persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "lam": self.lam,
            "rho": self.rho,
            "num_updates": self.num_updates,
            "Z": {k: v.cpu() for k, v in self.Z.items()},
            "U": {k: v.cpu() for k, v in self.U.items()},
            "kept": {k: [r.cpu(), c.cpu()] for k, (r, c) in self.kept.items()},
            "alive": {k: a.cpu() for k, a in self.alive.items()},
            "prev_norms": {k: [r.cpu(), c.cpu()] for k, (r, c) in self._prev_norms.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise ValueError("not an SSAuto state; save it with SSAuto.state_dict().")
        if set(state["Z"]) != set(self.Z):
            raise ValueError(
                f"SSAuto state is for {sorted(state['Z'])}, this one has {sorted(self.Z)} (the "
                "spec's layers and their coupled BatchNorm entries); build it the same way."
            )
        self.lam, self.rho = float(state["lam"]), float(state["rho"])
        self.num_updates = int(state["num_updates"])
        if bool(state.get("U")) != self.dual:
            raise ValueError(
                f"SSAuto state was saved with dual={not self.dual}, this one has dual={self.dual};"
                " build it the same way."
            )
        self.Z = {k: v.clone() for k, v in state["Z"].items()}
        self.U = {k: v.clone() for k, v in state.get("U", {}).items()}
        self._set_targets()
        self.kept = {k: (r.clone(), c.clone()) for k, (r, c) in state["kept"].items()}
        self.alive = {k: a.clone() for k, a in state.get("alive", {}).items()}
        self._prev_norms = {k: (r.clone(), c.clone()) for k, (r, c) in state["prev_norms"].items()}


@torch.no_grad()
def _norm_after(model: nn.Module, layers: set[str], x: torch.Tensor) -> dict[str, str]:
    """``{layer: the BatchNorm module whose input is that layer's output}``, by one forward."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor itself: ids are reused
    found: dict[str, str] = {}
    hooks = []
    for name, m in model.named_modules():
        if name in layers:
            hooks.append(
                m.register_forward_hook(lambda m, i, o: produced.__setitem__(id(o), (names[m], o)))
            )
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):

            def pre(m, inputs):
                layer, out = produced.get(id(inputs[0]), (None, None))
                if out is inputs[0] and m.num_features == out.shape[1]:
                    found.setdefault(layer, names[m])

            hooks.append(m.register_forward_pre_hook(pre))
    was_training = model.training
    model.eval()
    try:
        model(x.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


class SoftRowsColumns(Constraint):
    """Marks a layer for :class:`SSAuto` in a spec: soft row + column penalties, no hard set."""

    min_ndim = 2

    def project(self, W: torch.Tensor, groups: int = 1) -> Projection:
        raise TypeError("SoftRowsColumns is a soft constraint: SSAuto.update() handles it.")

    def __repr__(self) -> str:
        return "SoftRowsColumns()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SoftRowsColumns)

    def __hash__(self) -> int:
        return hash("SoftRowsColumns")
