"""The per-layer solvers of one-shot pruning, one interface: ``(view, W [G, r, d], damped H
[G, d, d], sparse set, levels, options) → (Ŵ, support)``: magnitude, Wanda, SparseGPT and
ADMM (scaled, gradual support, exact least squares on the support, then quantization ADMM).
"""

from __future__ import annotations

import math

import torch

from ...sets.constraints import NM, Constraint, Filters, Intersection, Unstructured, keep_count
from ...sets.quantization import _Levels, levels_for, nearest_level
from .capture import _Gram, _View

__all__ = ["SOLVERS"]

SOLVERS = ("admm", "sparsegpt", "wanda", "magnitude")


def _split(c: Constraint, name: str) -> tuple[Constraint | None, _Levels | None]:
    """A spec entry as (sparsity set, quantization set); either may be None."""
    parts = c.parts if isinstance(c, Intersection) else (c,)
    levels = [p for p in parts if isinstance(p, _Levels)]
    sparse = [p for p in parts if not isinstance(p, _Levels)]
    if any(isinstance(p, Filters) for p in sparse):
        raise ValueError(
            f"{name!r}: Filters removes output rows, which no update inside the layer can "
            "reconstruct. Prune the next layer's input channels with Columns/Channels instead "
            "(one-shot reconstructs that layer), or use training-time ADMM for filters."
        )
    if len(levels) > 1:
        raise ValueError(f"{name!r}: {c!r} has two quantization sets; give one.")
    lv = levels[0] if levels else None
    if not sparse:
        return None, lv
    return (sparse[0] if len(sparse) == 1 else Intersection(*sparse)), lv


def _mask3(view: _View, sparse: Constraint, V3: torch.Tensor) -> torch.Tensor:
    """The support ``Π_S(V)`` chooses, as ``[G, rows, d]``."""
    return sparse.project(view.gemm(V3), view.G).support.reshape(V3.shape)


def _quantize_on(lv: _Levels, V3: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``Π_Q`` of the kept entries of ``V3`` (the whole layer shares one scale), 0 elsewhere."""
    kept = lv.project(V3[S]).Z
    return torch.zeros_like(V3).masked_scatter_(S, kept)


def _error(H: torch.Tensor, delta: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ)`` summed over groups."""
    return float((torch.bmm(delta, H) * delta).sum())


# ---------------------------------------------------------------------------------------------
# solvers: each maps (view, W [G, r, d], damped H [G, d, d], sets, options) → (Ŵ, support)


def _magnitude(view, W, H, sparse, lv, **_):
    S = _mask3(view, sparse, W) if sparse is not None else torch.ones_like(W, dtype=torch.bool)
    out = W * S
    return (_quantize_on(lv, out, S) if lv is not None else out), S


def _wanda(view, W, H, sparse, lv, *, x_norms, **_):
    if sparse is None:
        return _magnitude(view, W, H, sparse, lv)
    S = _mask3(view, sparse, W * x_norms.unsqueeze(1))  # |W_ij|·||X_j||, undamped
    out = W * S
    return (_quantize_on(lv, out, S) if lv is not None else out), S


def _sparsegpt(view, W, H, sparse, lv, *, blocksize: int = 128, **_):
    if sparse is not None and not isinstance(sparse, (Unstructured, NM)):
        raise ValueError(
            f"{view.name!r}: solver='sparsegpt' chooses Unstructured and N:M masks (its paper's "
            f"sets), not {sparse!r}; use solver='admm' for it."
        )
    levels = None
    if lv is not None:  # the joint mode quantizes on a grid fixed up front (as GPTQ does)
        ref = _magnitude(view, W, H, sparse, None)[0]
        levels = levels_for(lv, ref[ref != 0] if bool((ref != 0).any()) else ref.flatten())
    outs, supports = [], []
    for g in range(W.shape[0]):
        w, s = _sparsegpt_one(W[g], H[g], sparse, levels, blocksize)
        outs.append(w)
        supports.append(s)
    return torch.stack(outs), torch.stack(supports)


def _prune_counts(sparse, rows: int, d: int, i1: int, i2: int):
    """How many weights the block of columns ``[i1, i2)`` prunes: per row (``per_row``) or in
    the whole block, so that the totals after the last block are exactly the target's."""
    if sparse.per_row:
        p = d - keep_count(sparse.keep, d)
        return math.floor(p * i2 / d + 0.5) - math.floor(p * i1 / d + 0.5)
    p = rows * d - keep_count(sparse.keep, rows * d)
    return math.floor(p * i2 / d + 0.5) - math.floor(p * i1 / d + 0.5)


def _sparsegpt_one(W, H, sparse, levels, blocksize: int):
    """Frantar & Alistarh 2023, Algorithm 1 on one ``[r, d]`` weight."""
    W = W.clone()
    r, d = W.shape
    L = torch.linalg.cholesky(H.double())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(W.dtype)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    nm = isinstance(sparse, NM)
    B = max(sparse.m, blocksize // sparse.m * sparse.m) if nm else blocksize
    for i1 in range(0, d, B):
        i2 = min(i1 + B, d)
        W1 = W[:, i1:i2].clone()
        U1 = Hinv[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        P1 = torch.zeros_like(W1, dtype=torch.bool)
        diag = torch.diagonal(U1)
        if isinstance(sparse, Unstructured):
            score = W1.pow(2) / diag.pow(2)
            p = _prune_counts(sparse, r, d, i1, i2)
            if sparse.per_row:
                idx = torch.sort(score, dim=1, stable=True).indices[:, :p]
                P1.scatter_(1, idx, True)
            elif p > 0:
                idx = torch.sort(score.flatten(), stable=True).indices[:p]
                P1.view(-1)[idx] = True
        for j in range(i2 - i1):
            if nm and j % sparse.m == 0:
                score = W1[:, j : j + sparse.m].pow(2) / diag[j : j + sparse.m].pow(2)
                idx = torch.sort(score, dim=1, stable=True).indices[:, : sparse.m - sparse.n]
                P1[:, j : j + sparse.m].scatter_(1, idx, True)
            w = W1[:, j]
            q = w.masked_fill(P1[:, j], 0)
            if levels is not None:
                q = torch.where(P1[:, j], q, nearest_level(q, levels))
            err = (w - q) / U1[j, j]
            W1[:, j:].sub_(err.unsqueeze(1) * U1[j, j:].unsqueeze(0))
            W1[:, j] = q  # exactly: pruned entries are +0.0, kept ones on their level
            E1[:, j] = err
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = P1
        W[:, i2:].sub_(E1 @ Hinv[i1:i2, i2:])
    return W, ~pruned


class _Inverses:
    """``(H + ρI)⁻¹`` per value of ρ, from a float64 Cholesky factorization (cached: ρ changes
    only every few iterations). A ρ change costs one d×d inversion, and each W-step is then
    one GEMM; an eigendecomposition would serve every ρ but costs ~10–30× a Cholesky on CPU
    and two GEMMs per step."""

    def __init__(self, H: torch.Tensor) -> None:
        self.H, self.rho, self.inv = H, None, None

    def __call__(self, rho: float) -> torch.Tensor:
        if rho != self.rho:
            eye = torch.eye(self.H.shape[-1], dtype=torch.float64, device=self.H.device)
            L = torch.linalg.cholesky(self.H.double() + rho * eye)
            self.inv, self.rho = torch.cholesky_inverse(L).to(self.H.dtype), rho
        return self.inv


def _w_step(B, Z, U, rho, inverses: _Inverses):
    """``Ŵ = (B + ρ(Z − U)) (H + ρI)⁻¹`` with ``B = W H``."""
    return torch.bmm(B + rho * (Z - U), inverses(rho))


def _least_squares(W0, H, S, W_start, *, tol: float, max_iter: int, B=None):
    """``argmin tr(Ŵ H Ŵᵀ) − 2 tr(Ŵ Bᵀ)`` over Ŵ supported on ``S`` (``B = W0 H`` unless
    given: ``tr((Ŵ − W0) H (Ŵ − W0)ᵀ)``), per row ``H_ss ŵ_s = b_s``: one Cholesky when every
    row of a group shares its support, otherwise conjugate gradients on ``M ⊙ (Ŵ H) = M ⊙ B``
    from ``W_start``."""
    out = torch.zeros_like(W0)
    Mf = S.to(W0.dtype)
    own = B is None  # then a row that keeps everything is W0 itself
    B = (torch.bmm(W0, H) if own else B) * Mf
    for g in range(W0.shape[0]):
        if bool((S[g] == S[g, :1]).all()):
            idx = S[g, 0].nonzero().flatten()
            if idx.numel():
                Hs = H[g][idx][:, idx].double()
                sol = torch.cholesky_solve(B[g][:, idx].double().T, torch.linalg.cholesky(Hs))
                out[g][:, idx] = sol.T.to(W0.dtype)
            continue
        out[g] = _cg(H[g], B[g], Mf[g], W_start[g] * Mf[g], tol, max_iter)
        if own:
            full = S[g].all(dim=1)  # a row that keeps everything is its own least squares
            out[g][full] = W0[g][full]
    return out


def _cg(H, B, M, X, tol: float, max_iter: int):
    """Batched conjugate gradients, one system per row: ``M ⊙ (x H) = b`` on the support."""
    R = B - (X @ H) * M
    P = R.clone()
    rs = (R * R).sum(1)
    bound = (tol**2) * (B * B).sum(1).clamp_min(1e-30)
    for _ in range(max_iter):
        if bool((rs <= bound).all()):
            break
        AP = (P @ H) * M
        alpha = rs / (P * AP).sum(1).clamp_min(1e-30)
        X = X + alpha.unsqueeze(1) * P
        R = R - alpha.unsqueeze(1) * AP
        rs_new = (R * R).sum(1)
        P = R + (rs_new / rs.clamp_min(1e-30)).unsqueeze(1) * P
        rs = rs_new
    return X


def _admm(view, W, H, sparse, lv, *, iters: int = 40, ramp: int = 30, rho: float = 0.01,
          rho_growth: float = 1.3, rho_every: int = 3, cg_tol: float = 1e-4,
          cg_iters: int = 50, quant_iters: int = 30, quant_rho: float = 0.01,
          quant_rho_growth: float = 1.2, C=None, **_):  # fmt: skip
    S = torch.ones_like(W, dtype=torch.bool)
    out = W
    if sparse is not None and bool(_mask3(view, sparse, W).all()) and C is None:
        sparse = None  # the set keeps every weight (e.g. keep=1): W is the exact solution
    if sparse is not None:
        D = torch.diagonal(H, dim1=1, dim2=2).sqrt()  # scale to a unit diagonal
        Hn = H / D.unsqueeze(2) / D.unsqueeze(1)
        Wn = W * D.unsqueeze(1)
        inverses = _Inverses(Hn)
        # the linear term W·H (or W·C for the dense target), in the scaled variables
        Bn = torch.bmm(Wn, Hn) if C is None else torch.bmm(W, C) / D.unsqueeze(1)
        if C is not None:  # start from the unconstrained optimum B H⁻¹
            Wn = torch.linalg.solve(Hn.double(), Bn.double().transpose(1, 2))
            Wn = Wn.transpose(1, 2).to(W.dtype)
        Z, U = Wn, torch.zeros_like(Wn)  # dense start: the ramp prunes from k = 0 on
        Wh = Wn
        for k in range(iters):
            rho_k = rho * rho_growth ** (k // rho_every)
            Wh = _w_step(Bn, Z, U, rho_k, inverses)
            frac = min(1.0, (k + 1) / max(1, ramp)) ** 3
            S_k = sparse.with_keep(lambda keep, f=frac: 1.0 - (1.0 - keep) * f)
            V = Wh + U
            Z = V * _mask3(view, S_k, V)
            U = U + Wh - Z
            rho_next = rho * rho_growth ** ((k + 1) // rho_every)
            if rho_next != rho_k:
                U = U * (rho_k / rho_next)
        S = _mask3(view, sparse, Wh + U)
        Wn_hat = _least_squares(Wn, Hn, S, Wh, tol=cg_tol, max_iter=cg_iters,
                                B=None if C is None else Bn)  # fmt: skip
        out = Wn_hat / D.unsqueeze(1)
    if lv is not None:
        B = torch.bmm(W, H) if C is None else torch.bmm(W, C)
        out = _admm_quantize(B, H, S, out, lv, quant_iters, quant_rho, quant_rho_growth)
    return out, S


def _objective(H, B, Z) -> float:
    """``tr(Z H Zᵀ) − 2 tr(Z Bᵀ)``: with ``B = W H`` the layer error of ``Z`` less a
    constant, so the two rank candidates alike."""
    return float((torch.bmm(Z, H) * Z).sum() - 2 * (Z * B).sum())


def _admm_quantize(B, H, S, start, lv, iters: int, rho: float, growth: float):
    """ADMM on ``{Ŵ : Ŵ_S on the levels, Ŵ_¬S = 0}`` in the unscaled variables (objective
    ``tr(Ŵ H Ŵᵀ) − 2 tr(Ŵ Bᵀ)``), from the pruned solution ``start``; the final scale
    refitted in closed form for the chosen codes; the best of the nearest-level rounding and
    the ADMM iterates is kept."""
    inverses = _Inverses(H)
    rho0 = rho * float(torch.diagonal(H, dim1=1, dim2=2).mean())
    Z = _quantize_on(lv, start, S)
    best, best_obj = Z, _objective(H, B, Z)
    U = torch.zeros_like(start)
    for k in range(iters):
        Wh = _w_step(B, Z, U, rho0 * growth ** (k // 3), inverses)
        Z = _quantize_on(lv, Wh + U, S)
        U = U + Wh - Z
        if (k + 1) % 3 == 0:  # ρ grows: rescale the scaled dual
            U = U / growth
        obj = _objective(H, B, Z)
        if obj < best_obj:
            best, best_obj = Z, obj
    return _refit_scale(B, H, best)


def _refit_scale(B, H, Z):
    """``a·C`` with the codes ``C = Z / max|Z|`` fixed and ``a = tr(C Bᵀ)/tr(C H Cᵀ)``: the
    least-squares scale for those codes (the levels stay a scaled copy of the level set)."""
    top = float(Z.abs().max())
    if top == 0.0:
        return Z
    C = Z / top
    den = float((torch.bmm(C, H) * C).sum())
    a = float((C * B).sum()) / den if den > 0 else 0.0
    if not a > 0:
        return Z
    refit = a * C
    return refit if _objective(H, B, refit) <= _objective(H, B, Z) else Z


_SOLVE = {"admm": _admm, "sparsegpt": _sparsegpt, "wanda": _wanda, "magnitude": _magnitude}
_OPTIONS = {
    "admm": {"iters", "ramp", "rho", "rho_growth", "rho_every", "cg_tol", "cg_iters",
             "quant_iters", "quant_rho", "quant_rho_growth"},
    "sparsegpt": {"blocksize"},
    "wanda": set(),
    "magnitude": set(),
}  # fmt: skip


def _damped(g: _Gram, damp: float) -> torch.Tensor:
    """``H/n + damp·mean(diag)·I``; a dead input (``H_jj = 0``, its weights multiply zeros)
    gets the mean diagonal, so the factorizations stay regular at the Gram's own scale (a
    fixed value such as 1 would rank dead inputs above live ones after scaling)."""
    H = g.H / max(1, g.n)
    diag = torch.diagonal(H, dim1=1, dim2=2)
    dead = diag == 0
    live = (~dead).sum(1).clamp_min(1)
    mean = (diag.sum(1) / live).view(-1, 1)
    mean = torch.where(mean > 0, mean, torch.ones_like(mean))
    diag.copy_(torch.where(dead, mean, diag) + damp * mean)
    return H
