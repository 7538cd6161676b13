r"""Row + column group sparsity: the proximal operator of group norms over the rows and the
columns of a GEMM view, and the sets that mark a layer for SS-Auto.

**One group set** has a closed-form prox, group soft-thresholding:
``Z_g = max(0, 1 − τ_g/||V_g||)·V_g`` (:func:`group_soft_threshold`). **Rows and columns
overlap**, and the prox of their sum has no closed form; :func:`prox_rows_columns` computes it
with the Dykstra-like proximal splitting of Bauschke & Combettes (iterate the row prox and the
column prox with two correction terms; converges to the exact prox of the sum). Its last row
step's zero rows and last column step's zero columns are both applied, so every group the prox
kills is exactly zero.

:class:`RowsColumns` is the support an SS-Auto run chose (its projection keeps those rows ×
columns); :class:`SoftRowsColumns` marks a layer for :class:`admmprune.SSAuto` in a spec.
"""

from __future__ import annotations

import torch

from .constraints import Constraint, Projection

__all__ = ["RowsColumns", "SoftRowsColumns", "group_soft_threshold", "prox_rows_columns"]


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


class RowsColumns(Constraint):
    """The support an :class:`SSAuto` run chose for one layer: given rows × columns of the GEMM
    view. Its projection keeps exactly those entries (used by the final hard prune)."""

    min_ndim = 2
    support_set = True

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        self.rows, self.cols = rows.bool(), cols.bool()

    def project(self, W: torch.Tensor, groups: int = 1) -> Projection:
        mask = self.rows.to(W.device)[:, None] & self.cols.to(W.device)[None, :]
        support = mask.reshape(W.shape)
        return Projection(W * support, support)

    def __repr__(self) -> str:
        return f"RowsColumns(rows={int(self.rows.sum())}, cols={int(self.cols.sum())})"


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
