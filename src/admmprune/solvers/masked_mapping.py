"""The authors' quantized retraining (ADMM-NN): freeze a growing share of the kept weights on
their nearest level, train the rest, until every weight is on a level."""

from __future__ import annotations

import torch

from ..sets.quantization import levels_for, nearest_level
from ..weights.masks import hold_fixed
from ..weights.select import select

__all__ = ["MaskedMapping"]


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
