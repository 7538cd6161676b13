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

**The prox** of the row and column group norms (group soft-thresholding, and Dykstra's
splitting where rows and columns overlap) is :func:`admmprune.sets.rows_columns.prox_rows_columns`.

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
from dataclasses import replace

import torch
from torch import nn

from ..sets.rows_columns import RowsColumns, SoftRowsColumns
from ..weights.masks import Masks, check_finite, hard_prune
from ..weights.select import Key, Spec, select
from .admm import _proximal_penalty
from .ssauto_rates import _AutomaticRates, _Coupled

__all__ = ["SSAuto"]

_FORMAT = "admmprune.SSAuto"


class SSAuto(_AutomaticRates):
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
        _check_args(target, by, example_input, rho, rho_growth, min_keep, iters)
        self.model, self.target, self.by = model, float(target), by
        self.rho, self.rho_growth, self.reweight, self.iters = rho, rho_growth, reweight, iters
        self.debias, self.min_keep, self.dual = debias, float(min_keep), bool(dual)
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
            from ..weights.count import count

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
        from ..structure.groups import channel_groups

        try:
            groups = channel_groups(self.model, example_input, 1.0)
        except ValueError:  # no removable channel group: nothing is coupled
            return
        names = {t.name for t in self.targets}
        params = dict(self.model.named_parameters())
        for g in groups:
            if g.expert is not None:  # an expert's neurons: one slice of a fused weight
                continue
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

    # the Z-step: _AutomaticRates finds λ (ssauto_rates.py)
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


def _check_args(target, by, example_input, rho, rho_growth, min_keep, iters) -> None:
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
    if not 0 <= min_keep <= 1:
        raise ValueError(f"SSAuto(min_keep={min_keep!r}): a fraction in [0, 1].")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"SSAuto(iters={iters!r}): at least 1 Dykstra iteration.")


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
