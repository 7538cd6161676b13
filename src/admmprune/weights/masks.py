"""Hard pruning and masked retraining.

After ADMM, hard pruning sets ``W ← Π_S(W)`` and freezes the support ``M`` (a boolean mask).
Masked retraining then trains ``W ⊙ M``: a pruned weight must stay *exactly* zero whatever the
optimizer does (momentum, weight decay, Adam's moments would all regrow it otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .._io import atomic_save, safe_load
from .select import Spec, Target, select
from .shards import DTensor, local, row_shards, shape
from .shards import project as project_sharded

__all__ = ["Masks", "prune"]

_FORMAT = "admmprune.masks"


def check_finite(W: torch.Tensor, layer: str, when: str) -> None:
    """Raise ``ValueError`` naming ``layer`` if ``W`` holds NaN or Inf.

    A sum is non-finite iff some entry is (weights never sum past 3e38), and one fused
    reduction is several times cheaper than ``isfinite`` on a large tensor.
    """
    if bool(torch.isfinite(W.sum(dtype=torch.float32))):
        return
    raise ValueError(
        f"{layer!r} has {int((~torch.isfinite(W)).sum())} NaN/Inf weight(s) {when}. Training "
        "diverged: lower the learning rate or rho, or check the loss and the input data."
    )


def hold_fixed(fixed, optimizers, restore) -> list:
    """Hooks that keep the ``fixed`` entries of parameters where ``restore()`` puts them.

    ``fixed`` pairs each parameter with a boolean tensor of its fixed entries: their gradient is
    zeroed in backward, and ``restore()`` runs after every ``optimizer.step()`` (weight decay
    and momentum act inside the step). Returns the hook handles.
    """
    handles = [
        # FSDP2 reduces a sharded parameter's gradient outside autograd, then calls these
        p.register_post_accumulate_grad_hook(lambda p, f=f: local(p.grad).masked_fill_(f, 0))
        if isinstance(p, DTensor)
        else p.register_hook(lambda g, f=f: g.masked_fill(f, 0))
        for p, f in fixed
    ]
    handles += [opt.register_step_post_hook(lambda *_: restore()) for opt in optimizers]
    return handles


class Masks(Mapping[str, torch.Tensor]):
    """Fixed boolean supports ``{parameter name: M}`` of a model's pruned parameters.

    ``attach(optimizer)`` keeps ``W = W ⊙ M`` exactly through training: masked gradients are
    zeroed in backward, the optimizer's state is zeroed off the support, and after every
    ``optimizer.step()`` the weights off the support are set back to exactly 0.
    """

    #: what made the masks, when :func:`admmprune.oneshot` did (an ``OneShotReport``)
    report = None

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        self._model = model
        self._masks: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            if name not in params:
                raise ValueError(
                    f"mask for {name!r} but {type(model).__name__} has no such parameter; "
                    f"parameters: {', '.join(list(params)[:40])}."
                )
            p = params[name]
            if tuple(mask.shape) != shape(p):  # FSDP2: this rank's rows
                raise ValueError(
                    f"mask for {name!r} has shape {tuple(mask.shape)} but the parameter has "
                    f"{shape(p)}; the masks were made for another architecture."
                )
            self._masks[name] = mask.to(device=p.device, dtype=torch.bool).contiguous()
        self._params = {name: params[name] for name in self._masks}
        self._handles: list = []

    # Mapping protocol -------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        kept = ", ".join(f"{n}: {k:.3g}" for n, k in self.kept().items())
        return f"Masks({kept})"

    # Behaviour --------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self) -> None:
        """``W ← W ⊙ M`` for every masked parameter (exact +0.0 off the support)."""
        for name, p in self._params.items():
            local(p).masked_fill_(~self._masks[name], 0)

    def attach(self, *optimizers: torch.optim.Optimizer) -> Masks:
        """Keep pruned weights exactly zero while ``optimizers`` train the model."""
        self.apply()
        for opt in optimizers:
            self._zero_state(opt)
        fixed = [(p, ~self._masks[name]) for name, p in self._params.items()]
        self._handles += hold_fixed(fixed, optimizers, self.apply)
        return self

    def detach(self) -> None:
        """Remove every hook :meth:`attach` installed."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def _zero_state(self, opt: torch.optim.Optimizer) -> None:
        # Momentum and Adam moments left over from dense training would push pruned weights.
        for name, p in self._params.items():
            for value in opt.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    local(value).masked_fill_(~self._masks[name], 0)

    def kept(self) -> dict[str, float]:
        """Kept fraction per parameter."""
        return {n: float(m.float().mean()) for n, m in self._masks.items()}

    def total_kept(self) -> tuple[int, int]:
        """``(kept, total)`` weights over every masked parameter."""
        return (
            sum(int(m.sum()) for m in self._masks.values()),
            sum(m.numel() for m in self._masks.values()),
        )

    # torch.nn.utils.prune interop ------------------------------------------------------------
    def to_torch_prune(self) -> None:
        """Hand the masks to ``torch.nn.utils.prune``: each masked ``weight`` becomes its
        ``weight_orig`` parameter + ``weight_mask`` buffer reparametrization. Our hooks come
        off; the masks stay readable, and :meth:`from_torch_prune` brings them back.
        """
        from torch.nn.utils import prune as torch_prune

        self.detach()
        for name, mask in self._masks.items():
            module_name, _, attr = name.rpartition(".")
            module = self._model.get_submodule(module_name)
            torch_prune.custom_from_mask(module, attr, mask)

    @classmethod
    def from_torch_prune(cls, model: nn.Module) -> Masks:
        """Masks of every parameter ``torch.nn.utils.prune`` masks in ``model``.

        The reparametrization is made permanent (``prune.remove``: ``weight = weight_orig *
        weight_mask``), so the model has plain parameters again and the masks can
        :meth:`attach` to its optimizer.
        """
        from torch.nn.utils import prune as torch_prune

        found = {}
        for module_name, module in model.named_modules():
            for hook in list(module._forward_pre_hooks.values()):
                methods = getattr(hook, "_pruning_methods", [hook])
                if not all(isinstance(h, torch_prune.BasePruningMethod) for h in methods):
                    continue
                attr = hook._tensor_name
                mask = getattr(module, f"{attr}_mask").detach().bool().clone()
                torch_prune.remove(module, attr)
                found[f"{module_name}.{attr}" if module_name else attr] = mask
        if not found:
            raise ValueError(
                "no torch.nn.utils.prune reparametrization found in the model (no *_mask "
                "buffers); prune it with torch.nn.utils.prune first."
            )
        return cls(model, found)

    # Persistence ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Plain tensors and strings only, so ``torch.load(weights_only=True)`` reads it."""
        return {
            "format": _FORMAT,
            "version": 1,
            "masks": {n: m.cpu() for n, m in self._masks.items()},
        }

    @classmethod
    def from_state_dict(cls, model: nn.Module, state: Mapping) -> Masks:
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT:
            raise ValueError(
                "not an admmprune masks file (missing format tag); write one with Masks.save()."
            )
        return cls(model, state["masks"])

    def save(self, path: str | os.PathLike) -> None:
        """Write the masks atomically (temporary file + rename)."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module) -> Masks:
        """Read masks written by :meth:`save` for ``model`` (``weights_only`` loading)."""
        return cls.from_state_dict(model, safe_load(path, "masks"))


@torch.no_grad()
def hard_prune(model: nn.Module, targets: Sequence[Target], project=None) -> Masks:
    """``W ← Π_S(W)`` for each target; the supports become fixed :class:`Masks`.

    ``project`` maps ``{name: W}`` to ``{name: Projection}`` when targets are projected jointly
    (coupled channel groups); by default each target's own constraint projects it.
    """
    if not targets:
        raise ValueError("nothing to prune: no targets.")
    for t in targets:
        check_finite(local(t.param), t.name, "at hard pruning")
    W = {t.name: local(t.param).detach() for t in targets}
    project = project or (lambda W: {t.name: _project(t, W[t.name]) for t in targets})
    projected = project(W)
    for t in targets:
        local(t.param).copy_(projected[t.name].Z)
    return Masks(model, {t.name: projected[t.name].support for t in targets})


def _project(t: Target, W: torch.Tensor):
    """``Π_S`` of ``t``'s set on ``W`` (this rank's rows under FSDP2: the set over all ranks)."""
    sh = row_shards(t.param, t.name)
    return t.project(W) if sh is None else project_sharded(t, W, sh)


def prune(model: nn.Module, spec: Spec, default=None) -> Masks:
    """One-shot projection pruning ``W ← Π_S(W)`` with no ADMM (magnitude pruning).

    The same spec as :class:`admmprune.ADMM`; returns the :class:`Masks` to retrain with.
    """
    return hard_prune(model, select(model, spec, default))
