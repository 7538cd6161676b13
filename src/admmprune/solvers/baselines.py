"""How a compression stage induces sparsity: ADMM, or the heuristics ADMM is compared with.

Every method has one interface, driven by the pipeline (or by your own loop)::

    m.start(epoch, state)     # → metric rows; builds what the stage needs (fresh or resumed)
    m.admm                    # the ADMM whose penalty the W-step adds, or None
    m.after_step(step)        # after every optimizer step (global step within the stage)
    m.end_epoch(epoch)        # → metric rows; Z/U updates, new rounds, pruning steps
    m.finish()                # → the final Masks at the target constraints
    m.state_dict()            # what a resumed stage needs

The heuristics, all on the same masks and retraining machinery:

- ``magnitude``: one-shot Π_S(W) at the start, then masked fine-tuning.
- ``iterative`` (Han et al. 2015): ``cycles`` prune → retrain cycles; cycle ``c`` keeps
  ``keep^{c/C}`` (a geometric path to the target).
- ``gradual`` (Zhu & Gupta 2017): the pruned share follows ``s_t = s_f·(1 − (1 − t/T)^3)``,
  re-pruned every ``prune_every`` steps until ``T = end`` × the stage's steps.

``ssauto`` (SS-Auto) has no per-layer rates: soft row + column penalties with one global λ
(:class:`admmprune.SSAuto`); its ``admm`` is the SSAuto object (same penalty interface).

``admm`` with ``rounds = R > 1`` is progressive ADMM: round ``r`` runs ADMM towards
``keep^{(r+1)/R}``, hard-prunes, and the next round starts from that pruned model with its
zeros held by masks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..sets.constraints import Constraint
from ..weights.masks import Masks, prune
from .admm import ADMM
from .ssauto import SSAuto

__all__ = ["METHODS", "cubic_keep", "geometric_keep", "make_method"]

METHODS = ("admm", "magnitude", "iterative", "gradual", "ssauto")


def geometric_keep(keep: float, fraction: float) -> float:
    """``keep^fraction``: 1 at fraction 0, ``keep`` at fraction 1."""
    return keep**fraction


def cubic_keep(keep: float, fraction: float) -> float:
    """Zhu & Gupta: pruned share ``(1 − keep)·(1 − (1 − f)^3)``; returns the kept share."""
    f = min(max(fraction, 0.0), 1.0)
    return 1.0 - (1.0 - keep) * (1.0 - (1.0 - f) ** 3)


def _scaled(spec: dict, default, fn):
    s = {k: (None if c is None else c.with_keep(fn)) for k, c in spec.items()}
    return s, (None if default is None else default.with_keep(fn))


class _Method:
    admm: ADMM | None = None

    def __init__(
        self,
        model: nn.Module,
        spec: dict,
        default: Constraint | None,
        optimizer,
        epochs: int,
        steps_per_epoch: int,
    ) -> None:
        self.model, self.spec, self.default = model, spec, default
        self.optimizer, self.epochs, self.steps_per_epoch = optimizer, epochs, steps_per_epoch
        self.masks: Masks | None = None

    def _set_masks(self, masks: Masks) -> None:
        if self.masks is not None:
            self.masks.detach()
        self.masks = masks.attach(self.optimizer)

    def _prune_to(self, fn) -> dict:
        spec, default = _scaled(self.spec, self.default, fn)
        self._set_masks(prune(self.model, spec, default))
        kept, total = self.masks.total_kept()
        return {"event": "prune", "kept": kept, "total": total}

    def start(self, epoch: int, state: dict | None) -> list[dict]:
        if state and state.get("masks") is not None:
            self._set_masks(Masks.from_state_dict(self.model, state["masks"]))
        return []

    def after_step(self, step: int) -> list[dict]:
        return []

    def end_epoch(self, epoch: int) -> list[dict]:
        return []

    def finish(self) -> Masks:
        """Hard prune to the target: ``W ← Π_S(W)``; the previous masks come off."""
        if self.masks is not None:
            self.masks.detach()
        return prune(self.model, self.spec, self.default)

    def state_dict(self) -> dict:
        return {"masks": self.masks.state_dict() if self.masks is not None else None}


class Magnitude(_Method):
    def start(self, epoch: int, state: dict | None) -> list[dict]:
        super().start(epoch, state)
        return [] if self.masks is not None else [self._prune_to(lambda k: k)]


class Iterative(_Method):
    def __init__(self, *args, cycles: int = 3, **kw) -> None:
        super().__init__(*args, **kw)
        self.cycles = max(1, min(cycles, max(self.epochs, 1)))

    def _cycle_start(self, c: int) -> int:
        return math.floor(c * self.epochs / self.cycles)

    def start(self, epoch: int, state: dict | None) -> list[dict]:
        super().start(epoch, state)
        if self.masks is not None:
            return []
        return [self._prune_to(lambda k: geometric_keep(k, 1 / self.cycles))]

    def end_epoch(self, epoch: int) -> list[dict]:
        for c in range(1, self.cycles):
            if epoch == self._cycle_start(c):
                return [self._prune_to(lambda k, c=c: geometric_keep(k, (c + 1) / self.cycles))]
        return []


class Gradual(_Method):
    def __init__(self, *args, prune_every: int = 50, end: float = 0.75, **kw) -> None:
        super().__init__(*args, **kw)
        self.prune_every = prune_every
        self.total = max(1, round(end * self.epochs * self.steps_per_epoch))

    def start(self, epoch: int, state: dict | None) -> list[dict]:
        super().start(epoch, state)
        if self.masks is not None:
            return []
        first = 1 / max(1, self.total // self.prune_every)
        return [self._prune_to(lambda k: cubic_keep(k, first))]

    def after_step(self, step: int) -> list[dict]:
        if step % self.prune_every == 0 and step <= self.total:
            return [self._prune_to(lambda k: cubic_keep(k, step / self.total))]
        return []


class Admm(_Method):
    def __init__(
        self,
        *args,
        rounds: int = 1,
        update_every: int = 1,
        updates_per_epoch: int = 0,
        admm_kwargs: dict,
        **kw,
    ):
        super().__init__(*args, **kw)
        self.rounds = max(1, min(rounds, max(self.epochs, 1)))
        self.update_every = update_every
        # updates_per_epoch > 0: Z/U updates every that share of an epoch, not every N epochs
        spe, upe = self.steps_per_epoch, updates_per_epoch
        self.update_steps = {j * spe // upe for j in range(1, upe + 1)} if upe else set()
        self.admm_kwargs = admm_kwargs

    def _round_of(self, epoch: int) -> int:
        return min(self.rounds - 1, epoch * self.rounds // max(self.epochs, 1))

    def _round_start(self, r: int) -> int:
        return -(-r * self.epochs // self.rounds)  # ceil

    def _round_spec(self, r: int):
        return _scaled(self.spec, self.default, lambda k: geometric_keep(k, (r + 1) / self.rounds))

    def _new_admm(self, r: int) -> None:
        if self.admm is not None:
            self.admm.close()
        spec, default = self._round_spec(r)
        self.admm = ADMM(self.model, spec, default=default, **self.admm_kwargs)

    def start(self, epoch: int, state: dict | None) -> list[dict]:
        super().start(epoch, state)
        self._new_admm(self._round_of(epoch))
        if state and state.get("admm") is not None:
            self.admm.load_state_dict(state["admm"])
        return []

    def _update(self, r: int) -> dict:
        n = self.admm.num_updates + 1
        return {"event": "update", "round": r, "update": n, "layers": self.admm.update()}

    def after_step(self, step: int) -> list[dict]:
        within = step % self.steps_per_epoch or self.steps_per_epoch  # 1-based in the epoch
        if within in self.update_steps:
            return [self._update(self._round_of((step - 1) // self.steps_per_epoch))]
        return []

    def end_epoch(self, epoch: int) -> list[dict]:
        rows = []
        r = self._round_of(epoch - 1)
        since = epoch - self._round_start(r)
        if not self.update_steps and (
            since % self.update_every == 0 or epoch == self._round_start(r + 1)
        ):
            rows.append(self._update(r))
        if r < self.rounds - 1 and epoch == self._round_start(r + 1):
            masks = self.admm.prune()
            if self.masks is not None:
                self.masks.detach()
            self.masks = masks.attach(self.optimizer)
            kept, total = masks.total_kept()
            rows.append({"event": "prune", "round": r, "kept": kept, "total": total})
            self._new_admm(r + 1)
        return rows

    def finish(self) -> Masks:
        if self.masks is not None:
            self.masks.detach()
        masks = self.admm.prune()
        self.admm = None
        return masks

    def state_dict(self) -> dict:
        return {**super().state_dict(), "admm": self.admm.state_dict() if self.admm else None}


class SsAuto(_Method):
    def __init__(self, *args, updates_per_epoch: int = 1, ssauto_kwargs: dict, **kw):
        super().__init__(*args, **kw)
        spe, upe = self.steps_per_epoch, max(1, updates_per_epoch)
        self.update_steps = {j * spe // upe for j in range(1, upe + 1)}
        self.ssauto_kwargs = ssauto_kwargs

    def start(self, epoch: int, state: dict | None) -> list[dict]:
        self.admm = SSAuto(self.model, self.spec, **self.ssauto_kwargs)
        if state and state.get("ssauto") is not None:
            self.admm.load_state_dict(state["ssauto"])
        return []

    def after_step(self, step: int) -> list[dict]:
        within = step % self.steps_per_epoch or self.steps_per_epoch
        if within in self.update_steps:
            n = self.admm.num_updates + 1
            return [{"event": "update", "round": 0, "update": n, **self.admm.update()}]
        return []

    def finish(self) -> Masks:
        masks = self.admm.prune()
        self.admm = None
        return masks

    def state_dict(self) -> dict:
        return {"ssauto": self.admm.state_dict() if self.admm else None}


def make_method(
    name: str, model, spec, default, optimizer, *, epochs: int, steps_per_epoch: int, **options
) -> _Method:
    """Build compression method ``name`` (one of :data:`METHODS`) for one stage."""
    common = (model, spec, default, optimizer)
    kw = {"epochs": epochs, "steps_per_epoch": steps_per_epoch}
    if name == "admm":
        return Admm(*common, **kw, **options)
    if name == "magnitude":
        return Magnitude(*common, **kw)
    if name == "iterative":
        return Iterative(*common, **kw, **options)
    if name == "gradual":
        return Gradual(*common, **kw, **options)
    if name == "ssauto":
        return SsAuto(*common, **kw, **options)
    raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.")


def weights_kept(model: nn.Module, masks: Masks) -> tuple[int, int]:
    """Non-zero and total weights over the masked parameters (after training)."""
    params = dict(model.named_parameters())
    nz = sum(int(torch.count_nonzero(params[n])) for n in masks)
    return nz, sum(params[n].numel() for n in masks)
