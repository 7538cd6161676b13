r"""Hard-constraint ADMM (ADMM-NN, StructADMM, ADMM-NN-S), usable from any training loop.

Problem: ``min f(W)  s.t.  W_i ∈ S_i``. Scaled augmented Lagrangian, iterated k = 0, 1, …::

    W^{k+1}   = argmin_W f(W) + Σ_i rho/2 · ||W_i − Z_i^k + U_i^k||²   (your SGD steps)
    Z_i^{k+1} = Π_{S_i}(W_i^{k+1} + U_i^k)                             (update())
    U_i^{k+1} = U_i^k + W_i^{k+1} − Z_i^{k+1}                          (update())

with ``Z⁰ = Π_S(W⁰)`` and ``U⁰ = 0``. With a diagonal metric ``m`` (``metric=``) the Z-step and
the final hard prune are ``Π_S^m(V) = argmin_{Z∈S} Σ m_i (Z_i − V_i)²``, exact for every sparsity
set: the support of ``Π_S(√m ⊙ V)`` (:mod:`admmprune.sets.weighted`).

The penalty's gradient is ``rho·(W − Z + U)``; it enters either through :meth:`ADMM.penalty`
added to the loss (``mode="penalty"``) or through gradient hooks with no autograd graph
(``mode="grad"``). ``Z`` and ``U`` are kept in fp32 on the parameter's device whatever the
parameter's dtype, and the penalty is computed in fp32.

When rho changes from ``rho_k`` to ``rho_{k+1}`` the scaled dual is rescaled,
``U ← U · rho_k / rho_{k+1}``, so the unscaled multiplier ``rho·U`` is unchanged
(Boyd et al. 2011, §3.4.1).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..sets.constraints import Columns, Constraint, Projection, Unstructured
from ..sets.sharded import total as sharded_sum
from ..sets.weighted import check_support_set, project_weighted
from ..structure.groups import ChannelGroup
from ..weights import shards
from ..weights.experts import is_transposed as experts_transposed
from ..weights.masks import Masks, check_finite, hard_prune
from ..weights.select import Spec, Target, select
from ..weights.shards import local
from .admm_metric import Source, make_metric
from .admm_state import STATE_DTYPES, _LayerState, _LowState, make_state

# the sets a coupled channel group member may also carry (filter + column): top-k selections,
# which never revive a channel the group zeroed
GROUP_COMBINABLE = (Columns, Unstructured)

__all__ = ["ADMM"]

_FORMAT = "admmprune.ADMM"
Rho = float | Sequence[float] | Callable[[int], float]


class _ProximalPenalty(torch.autograd.Function):
    """``Σ_i rho/2 · ||W_i − T_i||²`` with ``T = Z − U``, in fp32; gradient ``rho·(W_i − T_i)``.

    One node for every constrained weight (one Python call, not one per layer); the value comes
    from ``torch.dist``, which reads W and T without writing, and nothing is saved but
    references: the forward reads W and T once, the backward writes one ``rho·(W − T)`` per
    weight, not autograd's chain of copies.
    """

    @staticmethod
    def forward(ctx, rho: float, Ts: list, *Ws: torch.Tensor):
        ctx.save_for_backward(*Ws)
        ctx.rho, ctx.Ts = rho, Ts
        sq = [torch.dist(W.float(), _read(T)).square() for W, T in zip(Ws, Ts)]
        return 0.5 * rho * torch.stack(sq).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scale = ctx.rho * grad
        grads = [
            (W.float() - _read(T)).mul_(scale).to(W.dtype)
            for W, T in zip(ctx.saved_tensors, ctx.Ts)
        ]
        return None, None, *grads


def _read(T) -> torch.Tensor:
    """``T`` given as a tensor (SS-Auto) or as ADMM's layer state: fp32 state's cached ``T``,
    or low-precision state's computed now, one layer at a time (no fp32 copy of every layer's
    ``T`` lives from the forward to the backward)."""
    return T if torch.is_tensor(T) else T.T


def _proximal_penalty(Ws: list[torch.Tensor], Ts: list, rho: float) -> torch.Tensor:
    """``Σ_i rho/2 · ||W_i − T_i||²``, differentiable in the W's (a zero tensor for none)."""
    if not Ws:
        return torch.zeros(())
    return _ProximalPenalty.apply(rho, Ts, *Ws)


def _check_rho(value: float, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"rho {where} must be a positive number, got {value!r}.")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"rho {where} must be positive and finite, got {value!r}; e.g. rho=1e-3.")
    return value


class ADMM:
    """ADMM state (``Z``, ``U``, ``rho``) for every constrained parameter of ``model``.

    Args:
        model: the network; its parameters are trained by your own optimizer.
        spec: ``{name, glob or module type: constraint}`` (see :func:`admmprune.select`).
        default: constraint for every prunable weight the spec does not name.
        rho: initial penalty (float), a staged list (value at update k, the last one held),
            or a function ``k -> rho`` of the number of updates done.
        rho_growth: with a float ``rho``, multiply rho by this at every :meth:`update`.
        rho_max: with a float ``rho``, never grow rho past this.
        mode: ``"penalty"`` (add :meth:`penalty` to your loss) or ``"grad"`` (hooks add
            ``rho·(W − Z + U)`` to each gradient in backward; do not add the penalty). With
            loss scaling (``torch.amp.GradScaler``) pass ``grad_scaler``, or use
            ``"penalty"``.
        grad_scaler: with ``mode="grad"``, the ``torch.amp.GradScaler`` that scales your loss:
            the hooks then add ``S·rho·(W − Z + U)`` (``S`` its current scale, read on the
            device, no synchronisation), so that ``unscale_`` / ``step`` leave exactly
            ``rho·(W − Z + U)``. Without it, unscaling would divide the pull by ``S``.
        groups: coupled channel groups (:func:`admmprune.channel_groups`), each projected
            jointly so that every channel ADMM zeroes is physically removable. A group member
            that ``spec`` also gives :class:`Columns` or :class:`Unstructured` gets both sets
            (StructADMM's filter + column): the group's projection, then that set's projection
            of the result — a point in both sets (top-k selections never revive a zeroed
            channel), though not always the nearest one (as for :class:`Intersection`); the
            layer's keep counts all its columns, those of removed channels included.
        support: a fixed support per constrained parameter (e.g. the :class:`Masks` of an
            earlier pruning): ``Z = Π_S`` of the kept entries, zero elsewhere. This is how a
            pruned model is quantized (ADMM-NN-S); it needs element-wise constraints.
        init: where ``Z⁰`` comes from instead of ``Π_S(W⁰)``: :class:`Masks` (e.g. from
            :func:`admmprune.oneshot`: ``Z⁰ = W⁰ ⊙ M``) or ``{name: Z⁰}`` tensors, covering every
            constrained parameter. Training-time ADMM then starts from that solution.
        metric: the diagonal metric of the Z-step and the final hard prune, ``Z = argmin_{Z∈S}
            Σ m_i (Z_i − V_i)²`` (objective-aware: a weight is kept by ``m_i·w_i²``): an Adam /
            AdamW optimizer (its bias-corrected ``exp_avg_sq`` for each parameter), ``"fisher"``
            (mean squared gradients since the previous update), ``{name: tensor}`` or a
            function returning them; ``None``: Euclidean. Sparsity sets only.
        state_dtype: ``"float32"`` (Z, U and the cached T: 3× an fp32 weight), ``"bfloat16"``
            (Z and U in bf16, T computed when read: 1×) or ``"float8"`` (Z in float8_e4m3fn with
            a per-tensor scale, U in bf16: 0.75×); sparsity sets only. :meth:`state_bytes`.

    Under ``torch.amp.GradScaler`` either use ``mode="penalty"`` (the penalty is part of the
    scaled loss) or give ``mode="grad"`` the scaler (``grad_scaler=``).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: Spec,
        *,
        default: Constraint | None = None,
        rho: Rho = 1e-3,
        rho_growth: float = 1.0,
        rho_max: float | None = None,
        mode: str = "penalty",
        groups: Sequence[ChannelGroup] = (),
        support: Mapping[str, torch.Tensor] | None = None,
        init: Mapping[str, torch.Tensor] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        metric: Source | None = None,
        state_dtype: str = "float32",
    ) -> None:
        if mode not in ("penalty", "grad"):
            raise ValueError(
                f"mode={mode!r}: use 'penalty' (add admm.penalty() to the loss) or 'grad'."
            )
        if grad_scaler is not None and mode != "grad":
            raise ValueError(
                "grad_scaler= is for mode='grad' (its hooks write into the scaled gradients); "
                "in mode='penalty' the penalty is part of the loss the scaler scales: drop it."
            )
        if grad_scaler is not None and not hasattr(grad_scaler, "is_enabled"):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}."
            )
        self.grad_scaler = grad_scaler
        self.model = model
        self.mode = mode
        self._rho_spec = rho
        self._rho_growth = _check_rho(rho_growth, "growth")
        self._rho_max = None if rho_max is None else _check_rho(rho_max, "max")
        self.num_updates = 0
        self.rho = self._rho_at(0)
        self.groups = list(groups)
        self.targets: list[Target] = (
            select(model, spec, default) if (spec or default is not None or not self.groups) else []
        )
        self._also = self._combined()  # group members' second set (filter + column)
        self.targets = [t for t in self.targets if t.name not in self._also]
        self.targets += self._group_targets()
        self._shards = {t.name: shards.row_shards(t.param, t.name) for t in self.targets}
        shards.check(self._shards, bool(self.groups), support is not None, metric)
        self.support = self._check_support(support)
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype={state_dtype!r}: use one of {', '.join(STATE_DTYPES)}.")
        self.state_dtype = state_dtype
        for t in self.targets:
            if (metric is not None or state_dtype != "float32") and not isinstance(
                t.constraint, ChannelGroup
            ):
                check_support_set(t.constraint, t.name)
        self._metric = make_metric(metric, self.targets)
        self._state: dict[str, _LayerState | _LowState] = {}
        with torch.no_grad():
            W = {t.name: local(t.param).detach().float() for t in self.targets}
            for t in self.targets:
                check_finite(W[t.name], t.name, "at ADMM start")
            Z0 = self._initial(W, init)
            for t in self.targets:
                U0 = torch.zeros_like(W[t.name])
                self._state[t.name] = make_state(Z0[t.name], U0, state_dtype)
        self._hooks = []
        self._paused = False
        if mode == "grad":
            for t in self.targets:
                self._hooks.append(t.param.register_post_accumulate_grad_hook(self._grad_hook(t)))

    def _initial(self, W: dict, init: Mapping[str, torch.Tensor] | None) -> dict:
        """``Z⁰``: ``Π_S(W⁰)``, or taken from ``init`` (masks: ``W⁰ ⊙ M``; tensors: as given)."""
        if init is None:
            return {name: p.Z.clone() for name, p in self._project(W).items()}
        Z0 = {}
        for t in self.targets:
            if t.name not in init:
                raise ValueError(
                    f"init= has no entry for {t.name!r} (it covers {sorted(init)[:10]}); give "
                    "masks or Z⁰ for every constrained parameter, e.g. the Masks of oneshot()."
                )
            value = init[t.name]
            if tuple(value.shape) != tuple(W[t.name].shape):
                raise ValueError(
                    f"init[{t.name!r}] has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(W[t.name].shape)}."
                )
            value = value.to(W[t.name].device)
            if value.dtype == torch.bool:
                Z0[t.name] = W[t.name] * value
            else:
                Z0[t.name] = value.float().clone()
        return Z0

    # the sets S ------------------------------------------------------------------------------
    def _combined(self) -> dict[str, Constraint]:
        """The spec's sets on group members (Columns/Unstructured only), by parameter name."""
        members = {p for g in self.groups for p, _ in g.members}
        also = {}
        for t in self.targets:
            if t.name not in members:
                continue
            if not isinstance(t.constraint, GROUP_COMBINABLE):
                group = next(g for g in self.groups if t.name in dict(g.members))
                raise ValueError(
                    f"{t.name!r} is in {group!r} and the spec gives it {t.constraint!r}; a "
                    "coupled channel group combines only with Columns (filter + column) or "
                    "Unstructured. Leave the layer out of the spec, or use one of those."
                )
            also[t.name] = t.constraint
        return also

    def _group_targets(self) -> list[Target]:
        taken = {t.name for t in self.targets}
        modules = dict(self.model.named_modules())
        params = dict(self.model.named_parameters())
        out = []
        shared: dict[str, set] = {}  # a member's channels claimed by groups so far
        for g in self.groups:
            problem = g.problem(params)
            if problem:
                raise ValueError(
                    f"{g!r} does not fit {type(self.model).__name__}: {problem}. Build the "
                    "groups with channel_groups / head_groups on this model, or leave it out."
                )
            for pname, _, flat, _ in g._slices():
                # a BatchNorm after a concatenation, or one expert of a fused experts weight:
                # each group owns its own slice
                mine = {(g.expert, i) for i in flat}
                if pname in shared and not shared[pname] & mine and pname not in self._also:
                    shared[pname] |= mine
                    continue
                if pname in taken:
                    raise ValueError(
                        f"{pname!r} is in {g!r} and claimed elsewhere too (by the spec or another "
                        "group, with overlapping channels); constrain each parameter once."
                    )
                taken.add(pname)
                shared[pname] = mine
                mname, _, attr = pname.rpartition(".")
                experts = g.expert is not None
                fused = experts and params[pname].ndim == 3  # a weight, not an [E, rows] bias
                transposed = fused and experts_transposed(modules[mname])
                out.append(Target(pname, mname, modules[mname], attr, g, 1, transposed, experts))
        return out

    def _check_support(self, support: Mapping[str, torch.Tensor] | None) -> dict:
        if support is None:
            return {}
        out = {}
        for t in self.targets:
            if not getattr(t.constraint, "elementwise", False):
                raise ValueError(
                    f"{t.name!r}: support= needs an element-wise constraint (Unstructured, "
                    f"Quantized, Ternary, Binary), not {t.constraint!r}; structured sets choose "
                    "their own support, so leave support= out for them."
                )
            if t.name not in support:
                raise ValueError(
                    f"{t.name!r} is constrained but has no support mask (masks cover "
                    f"{sorted(support)}); pass the masks of every constrained layer."
                )
            mask = support[t.name]
            if tuple(mask.shape) != shards.shape(t.param):
                raise ValueError(
                    f"{t.name!r}: support mask of shape {tuple(mask.shape)} does not fit the "
                    f"weight {shards.shape(t.param)}."
                )
            out[t.name] = mask.to(torch.bool)
        return out

    def _global(self, t: Target, value: float) -> float:
        """``value`` summed over the ranks that hold ``t``'s shards (itself when whole)."""
        sh = self._shards.get(t.name)
        return value if sh is None else sharded_sum(value, sh.group, t.param.device)

    def _project_one(self, t: Target, V: torch.Tensor) -> Projection:
        sh = self._shards.get(t.name)
        if sh is not None:
            return shards.project(t, V, sh)
        mask = self.support.get(t.name)
        if mask is None:
            return t.project(V)
        mask = mask.to(V.device)
        if t.experts:  # each expert's kept entries on their own
            parts = [_on_support(t, v, m) for v, m in zip(V, mask, strict=True)]
            return Projection(
                torch.stack([p.Z for p in parts]), torch.stack([p.support for p in parts])
            )
        return _on_support(t, V, mask)

    def _project(self, V: Mapping[str, torch.Tensor]) -> dict[str, Projection]:
        """Π_S for every target (in the metric, with one)."""
        m = self._metric.values() if self._metric is not None else None
        if m is None:
            return self._euclidean(V)
        return project_weighted(self._euclidean, V, m)

    def _euclidean(self, V: Mapping[str, torch.Tensor]) -> dict[str, Projection]:
        """Euclidean Π_S for every target: one layer at a time, or a channel group jointly."""
        out = {
            t.name: self._project_one(t, V[t.name])
            for t in self.targets
            if not isinstance(t.constraint, ChannelGroup)
        }
        for g in self.groups:
            Z, support = g.project({p: V[p] for p, _ in g.members})
            for p in Z:
                if p in self._also:  # then the member's own set, on the group's result
                    second = self._also[p].project(Z[p])
                    Z[p], support[p] = second.Z, support[p] & second.support
                if p in out:  # shared with an earlier group, on disjoint channels: both hold
                    Z[p], support[p] = out[p].Z * support[p], out[p].support & support[p]
                out[p] = Projection(Z[p], support[p])
        return out

    # rho ---------------------------------------------------------------------------------------
    def _rho_at(self, k: int) -> float:
        spec = self._rho_spec
        if callable(spec):
            return _check_rho(spec(k), f"schedule({k})")
        if isinstance(spec, Sequence) and not isinstance(spec, str):
            if not spec:
                raise ValueError("rho as a list needs at least one value, e.g. [1e-3, 1e-2, 1e-1].")
            return _check_rho(spec[min(k, len(spec) - 1)], f"stage {min(k, len(spec) - 1)}")
        value = _check_rho(spec, "") * self._rho_growth**k
        return min(value, self._rho_max) if self._rho_max is not None else value

    # W-step ------------------------------------------------------------------------------------
    def _layer(self, t: Target) -> _LayerState | _LowState:
        """The layer's Z, U, moved to the parameter's device if the model moved."""
        st, device = self._state[t.name], t.param.device
        return st if st.device == device else st.to(device)

    def _residual(self, t: Target) -> torch.Tensor:
        """``W − Z + U = W − T`` in fp32, no graph."""
        return local(t.param).detach().float() - self._layer(t).T

    def penalty(self) -> torch.Tensor:
        """``Σ_i rho/2 · ||W_i − Z_i + U_i||²`` in fp32, differentiable in W; add it to the loss."""
        if self.mode != "penalty":
            raise RuntimeError(
                "mode='grad' already adds the penalty's gradient in backward; do not add "
                "admm.penalty() to the loss (use admm.penalty_value() to log it)."
            )
        Ts = [self._layer(t) for t in self.targets]  # each T read per layer (_read)
        return _proximal_penalty([local(t.param) for t in self.targets], Ts, self.rho)

    @torch.no_grad()
    def penalty_value(self) -> float:
        """The penalty's current value as a float, for logging in either mode."""
        return sum(
            self._global(t, float(0.5 * self.rho * self._residual(t).pow(2).sum()))
            for t in self.targets
        )

    def _grad_hook(self, t: Target):
        """``W.grad += rho·(W − T)`` in place once W's gradient is accumulated: two passes over
        W's size and no allocation (a pre-accumulation hook must return a new tensor, and the
        allocation alone cost more than the arithmetic: benchmarks/README.md, overhead). Runs
        before DDP's reducer hook on the same gradient, so the term is averaged with it (it is
        the same on every rank); tested."""

        def hook(param: torch.Tensor) -> None:
            if self._paused:  # an earlier micro-batch of the step (accumulating)
                return
            T, rho = self._layer(t).T, self.rho
            S = self._loss_scale()
            # FSDP2: this rank's rows and their gradient, already reduced across the ranks
            W, G = local(param), local(param.grad)
            with torch.no_grad():
                if G.dtype != T.dtype:  # fp16 / bf16 weights: the difference in fp32
                    pull = (W.float() - T).mul_(rho)
                    G.add_((pull if S is None else pull.mul_(S)).to(G.dtype))
                elif S is None:
                    G.add_(W, alpha=rho).sub_(T, alpha=rho)
                else:  # S stays a device tensor: reading it as a number would synchronise
                    G.addcmul_(W, S, value=rho).addcmul_(T, S, value=-rho)

        return hook

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Backward passes inside add no penalty gradient (``mode="grad"``): gradient
        accumulation over micro-batches adds it once, in the last backward of the step."""
        self._paused, was = True, self._paused
        try:
            yield
        finally:
            self._paused = was

    def _loss_scale(self) -> torch.Tensor | None:
        """The grad scaler's current scale as a 0-dim tensor, or ``None`` (no scaler, disabled,
        or it has not scaled a loss yet). ``_scale`` is GradScaler's own tensor: its public
        ``get_scale()`` returns a float, i.e. a device sync in every hook."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return getattr(scaler, "_scale", None)

    # Z-, U-steps -------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self) -> dict[str, dict[str, float]]:
        """One Z/U update, then the rho schedule. Returns per-layer metrics:

        ``primal = ||W − Z^{k+1}||``, ``dual = rho·||Z^{k+1} − Z^k||``, ``rho`` (used in the
        W-step just finished) and ``kept`` (fraction of the support of Z^{k+1}).
        """
        l1 = [g for g in self.groups if g.norm != "l2"]
        if l1:
            raise ValueError(
                f"{l1[0]!r} ranks channels by the L1 norm, which is not a Euclidean projection: "
                "use it for a one-shot prune() only; for ADMM build the groups with norm='l2'."
            )
        rho, rho_next = self.rho, self._rho_at(self.num_updates + 1)
        stats = {}
        W, V = {}, {}
        for t in self.targets:
            st = self._layer(t)
            W[t.name] = local(t.param).detach().float()
            check_finite(W[t.name], t.name, f"at ADMM update {self.num_updates + 1}")
            # Large fresh buffers cost page faults: the stale T and the old Z serve as scratch.
            V[t.name] = st.plus_U(W[t.name])  # W^{k+1} + U^k
        projected = self._project(V)
        for t in self.targets:
            st = self._state[t.name]
            Z, support = projected[t.name]
            if Z.data_ptr() == V[t.name].data_ptr():
                Z = Z.clone()
            # U^{k+1} = U^k + W^{k+1} − Z^{k+1}, rescaled for the next rho
            changed, primal = st.advance(W[t.name], Z, rho / rho_next if rho_next != rho else 1.0)
            if self._shards.get(t.name) is not None:  # norms and counts of the whole tensor
                changed, primal = (math.sqrt(self._global(t, v * v)) for v in (changed, primal))
            kept = self._global(t, int(torch.count_nonzero(support)))
            stats[t.name] = {
                "primal": primal,
                "dual": rho * changed,
                "rho": rho,
                "kept": kept / self._global(t, support.numel()),
            }
        self.rho = rho_next
        self.num_updates += 1
        if self._metric is not None:
            self._metric.updated()
        return stats

    @torch.no_grad()
    def residuals(self) -> dict[str, float]:
        """Current primal residual ``||W − Z||`` per layer (no update)."""
        return {
            t.name: math.sqrt(
                self._global(
                    t, float((local(t.param).detach().float() - self._layer(t).Z).pow(2).sum())
                )
            )
            for t in self.targets
        }

    # After ADMM --------------------------------------------------------------------------------
    def prune(self) -> Masks:
        """Hard prune ``W ← Π_S(W)``, fix the supports as :class:`Masks`, and remove the hooks."""
        self.close()
        return hard_prune(self.model, self.targets, self._project)

    def close(self) -> None:
        """Remove the gradient hooks of ``mode="grad"`` (the penalty stops acting)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._metric is not None:
            self._metric.close()

    # Persistence -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Z, U, rho and the update count; tensors and plain types only (``weights_only``-safe)."""
        return {
            "format": _FORMAT,
            "version": 1,
            "num_updates": self.num_updates,
            "rho": self.rho,
            "layers": {
                t.name: {**self._state[t.name].saved(), "constraint": repr(t.constraint)}
                for t in self.targets
            },
            "metric": self._metric.state_dict() if self._metric is not None else {},
            "state_dtype": self.state_dtype,
        }

    def state_bytes(self) -> int:
        """Bytes of ADMM state held for the constrained weights (Z, U and a cached T)."""
        return sum(st.nbytes() for st in self._state.values())

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` saved, after checking it fits this model and spec."""
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise ValueError(
                "not an ADMM state (missing format tag); save it with ADMM.state_dict()."
            )
        layers = state["layers"]
        saved_dtype = state.get("state_dtype", "float32")
        if saved_dtype != self.state_dtype:
            raise ValueError(
                f"ADMM state was saved with state_dtype={saved_dtype!r}, this ADMM has "
                f"{self.state_dtype!r}; resume with the state_dtype it was saved with."
            )
        ours = {t.name for t in self.targets}
        if set(layers) != ours:
            raise ValueError(
                f"ADMM state is for layers {sorted(layers)} but this spec constrains "
                f"{sorted(ours)}; load it with the spec it was saved with."
            )
        for t in self.targets:
            saved = layers[t.name]
            if saved["constraint"] != repr(t.constraint):
                raise ValueError(
                    f"{t.name!r}: state saved with {saved['constraint']} but the spec now says "
                    f"{t.constraint!r}; use the same constraint to resume."
                )
            if tuple(saved["U"].shape) != shards.shape(t.param):  # Z may be stored packed
                raise ValueError(
                    f"{t.name!r}: saved U has shape {tuple(saved['U'].shape)}, parameter has "
                    f"{shards.shape(t.param)} (on this rank)."
                )
        for t in self.targets:
            saved, dev = layers[t.name], t.param.device
            self._state[t.name] = (
                _LayerState.restored(saved, dev)
                if self.state_dtype == "float32"
                else _LowState.restored(saved, dev, self.state_dtype)
            )
        self.num_updates = int(state["num_updates"])
        self.rho = float(state["rho"])
        if self._metric is not None and state.get("metric"):
            self._metric.load_state_dict(state["metric"])


def _on_support(t: Target, V: torch.Tensor, mask: torch.Tensor) -> Projection:
    """``Π_S`` of the entries of ``V`` on ``mask`` only (an element-wise set), zero elsewhere."""
    kept = t.constraint.project(V[mask], t.groups)
    Z = torch.zeros_like(V).masked_scatter_(mask, kept.Z)
    support = torch.zeros_like(mask).masked_scatter_(mask, kept.support)
    return Projection(Z, support)
