"""SS-Auto's automatic rates: the prox of every layer at one global λ, the bisection for the λ
that meets the target, each layer's ``min_keep`` floor, and the trimming of the weakest
survivors (the module docstring of :mod:`.ssauto` states the method).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..sets.rows_columns import _prox_batch, _prox_coupled


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


class _AutomaticRates:
    """The Z-step's λ search, mixed into :class:`admmprune.SSAuto` (which holds the state it
    reads: targets, units, positions, rho, min_keep, Z, U)."""

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
