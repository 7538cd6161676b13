r"""The diagonal metric ``m`` of ADMM's projection ``Z = Π_S^m(W + U)`` (objective-aware ADMM).

The Euclidean projection keeps the weights of largest ``|w|``; a diagonal estimate of the loss's
curvature ``m`` keeps those of largest ``m_i·w_i²`` (the second-order loss increase of removing
them, Optimal Brain Damage's saliency), exactly, by
:func:`admmprune.sets.weighted.project_weighted`. Sources, one per class:

- an optimizer of the Adam family: its bias-corrected second moment
  ``v̂ = exp_avg_sq / (1 − β₂^step)`` of the same parameter (Elsa, ICLR 2026), read at each
  update; until every constrained parameter has an optimizer state the projection is Euclidean;
- ``"fisher"``: the mean squared gradient of each constrained parameter over the backward passes
  since the previous update (a diagonal empirical Fisher), accumulated by tensor hooks in fp32.
  In ``mode="grad"`` these see the loss's gradient alone; in ``mode="penalty"`` the penalty's
  pull ``rho·(W − Z + U)`` is part of the gradient they see;
- tensors ``{name: m}`` given by the user, or a function returning them at each update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..weights.shards import local, shape

__all__: list[str] = []  # internal: ADMM(metric=...) builds them


class _Metric:
    """``values()``: ``{parameter name: m}`` for every target, or ``None`` (Euclidean)."""

    def __init__(self, targets) -> None:
        self.targets = list(targets)

    def values(self) -> dict[str, torch.Tensor] | None:
        raise NotImplementedError

    def updated(self) -> None:
        """Called after each Z-update."""

    def close(self) -> None:
        """Remove any hook."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass


class _AdamMetric(_Metric):
    def __init__(self, targets, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(targets)
        name = type(optimizer).__name__
        if any("betas" not in g for g in optimizer.param_groups):
            raise ValueError(
                f"metric={name}: the metric is Adam's second moment (exp_avg_sq), which {name} "
                "does not keep; use an Adam / AdamW optimizer, metric='fisher' (squared "
                "gradients), or give {name: tensor} per constrained parameter."
            )
        self.optimizer = optimizer
        mine = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [t.name for t in self.targets if id(t.param) not in mine]
        if missing:
            raise ValueError(
                f"metric={name}: {missing[0]!r} is constrained but not trained by this optimizer "
                "(its second moment is the metric); pass the optimizer that trains the model."
            )

    def values(self) -> dict[str, torch.Tensor] | None:
        opt, out = self.optimizer, {}
        beta2 = {id(p): g["betas"][1] for g in opt.param_groups for p in g["params"]}
        for t in self.targets:
            state = opt.state.get(t.param)
            if not state:
                return None  # not stepped yet: Euclidean until every weight has a moment
            if "exp_avg_sq" not in state:
                raise ValueError(
                    f"metric={type(opt).__name__}: no exp_avg_sq in the state of {t.name!r}; "
                    "use an Adam / AdamW optimizer or metric='fisher'."
                )
            step = float(state["step"])
            v = local(state["exp_avg_sq"])  # FSDP2: this rank's rows, as the parameter's
            out[t.name] = v.float() / (1 - beta2[id(t.param)] ** step)
        return out


class _FisherMetric(_Metric):
    def __init__(self, targets) -> None:
        super().__init__(targets)
        self.sums = {t.name: torch.zeros_like(t.param, dtype=torch.float32) for t in self.targets}
        self.counts = dict.fromkeys(self.sums, 0)
        self._hooks = [t.param.register_hook(self._hook(t.name)) for t in self.targets]

    def _hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            s = self.sums[name]
            if s.device != grad.device:
                s = self.sums[name] = s.to(grad.device)
            s.addcmul_(grad.float(), grad.float())
            self.counts[name] += 1

        return hook

    def values(self) -> dict[str, torch.Tensor] | None:
        if not all(self.counts.values()):
            return None  # no gradient seen since the last update: Euclidean
        return {n: s / self.counts[n] for n, s in self.sums.items()}

    def updated(self) -> None:
        for s in self.sums.values():
            s.zero_()
        self.counts = dict.fromkeys(self.counts, 0)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def state_dict(self) -> dict:
        return {
            "fisher": {n: s.cpu() for n, s in self.sums.items()},
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if set(state.get("fisher", {})) != set(self.sums):
            raise ValueError("ADMM state's Fisher sums are for other layers; resume with the spec.")
        for n, s in state["fisher"].items():
            self.sums[n] = s.to(self.sums[n].device, torch.float32).clone()
        self.counts = {n: int(c) for n, c in state["counts"].items()}


class _GivenMetric(_Metric):
    def __init__(self, targets, given) -> None:
        super().__init__(targets)
        self.given = given

    def values(self) -> dict[str, torch.Tensor]:
        given = self.given() if callable(self.given) else self.given
        out = {}
        for t in self.targets:
            if t.name not in given:
                raise ValueError(
                    f"metric has no tensor for {t.name!r}; give one (the parameter's shape, "
                    "non-negative) for every constrained parameter: admm.targets names them."
                )
            m = torch.as_tensor(given[t.name])
            if tuple(m.shape) != shape(t.param):
                raise ValueError(
                    f"metric[{t.name!r}] has shape {tuple(m.shape)}, the parameter "
                    f"{shape(t.param)} (on this rank)."
                )
            m = m.detach().float()
            if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
                raise ValueError(f"metric[{t.name!r}] must be finite and non-negative.")
            out[t.name] = m
        return out


Source = torch.optim.Optimizer | str | Mapping[str, torch.Tensor] | Callable[[], Mapping]


def make_metric(metric: Source | None, targets) -> _Metric | None:
    """The metric object for ``ADMM(metric=...)`` (see the module docstring)."""
    if metric is None or (isinstance(metric, str) and metric == "none"):
        return None
    if isinstance(metric, torch.optim.Optimizer):
        return _AdamMetric(targets, metric)
    if isinstance(metric, str) and metric == "fisher":
        return _FisherMetric(targets)
    if isinstance(metric, Mapping) or (callable(metric) and not isinstance(metric, str)):
        return _GivenMetric(targets, metric)
    raise ValueError(
        f"metric={metric!r}: use None, an Adam/AdamW optimizer (its exp_avg_sq), 'fisher' "
        "(squared gradients) or {parameter name: tensor}."
    )
