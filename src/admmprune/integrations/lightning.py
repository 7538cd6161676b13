"""ADMM pruning inside a Lightning ``Trainer``: ``pip install 'admmprune[lightning]'``.

::

    from admmprune.integrations.lightning import ADMMCallback
    cb = ADMMCallback({"fc1": ap.Unstructured(0.05)}, start_epoch=2, admm_epochs=5, rho=1e-3)
    Trainer(max_epochs=10, callbacks=[cb]).fit(model, data)

Epochs before ``start_epoch`` train dense; the next ``admm_epochs`` run ADMM (``mode="grad"``:
the penalty's gradient ``rho·(W − Z + U)`` is added by hooks, so your ``training_step`` stays as
it is) with a Z/U update every ``update_every`` epochs; then the model is hard-pruned and every
later epoch is masked retraining (pruned weights stay exactly zero). The callback's state (ADMM
Z/U/rho or the masks) is saved in Lightning checkpoints and restored on resume. Under
``precision="16-mixed"`` the hooks scale their term with the Trainer's GradScaler.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from ..solvers.admm import ADMM
from ..weights.masks import Masks
from ..weights.select import Spec

__all__ = ["ADMMCallback"]


class ADMMCallback(pl.Callback):
    """Dense → ADMM → hard prune → masked retraining, driven by the Trainer's epochs.

    Args:
        spec, default: what to constrain, as for :class:`admmprune.ADMM` (names are those of the
            LightningModule's parameters).
        start_epoch: first ADMM epoch (0-based); ``admm_epochs``: how many.
        update_every: Z/U update every this many ADMM epochs (and after the last one).
        rho, rho_growth, rho_max: the penalty schedule, as for :class:`admmprune.ADMM`.
    """

    def __init__(
        self,
        spec: Spec,
        *,
        default=None,
        start_epoch: int = 0,
        admm_epochs: int = 1,
        update_every: int = 1,
        rho: float = 1e-3,
        rho_growth: float = 1.0,
        rho_max: float | None = None,
    ) -> None:
        if start_epoch < 0 or admm_epochs < 1 or update_every < 1:
            raise ValueError(
                "ADMMCallback: start_epoch >= 0, admm_epochs >= 1 and update_every >= 1."
            )
        self.spec, self.default = spec, default
        self.start, self.epochs, self.update_every = start_epoch, admm_epochs, update_every
        self.admm_kwargs = {"rho": rho, "rho_growth": rho_growth, "rho_max": rho_max}
        self.admm: ADMM | None = None
        self.masks: Masks | None = None
        self._pending: dict | None = None  # state loaded before the module was ready

    @property
    def end_epoch(self) -> int:
        return self.start + self.epochs  # first epoch of masked retraining

    def _new_admm(self, trainer: pl.Trainer, module) -> ADMM:
        # "16-mixed" scales the loss: the hooks must scale their term with it
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return ADMM(
            module, self.spec, default=self.default, mode="grad", grad_scaler=scaler,
            **self.admm_kwargs,
        )  # fmt: skip

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self._pending is not None:
            self._restore(trainer, pl_module, self._pending)
            self._pending = None
        if epoch == self.start and self.admm is None and self.masks is None:
            self.admm = self._new_admm(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.admm is None:
            return
        done = trainer.current_epoch + 1 - self.start
        if done % self.update_every == 0 or done == self.epochs:
            stats = self.admm.update()
            pl_module.log_dict(
                {f"admm/primal/{k}": v["primal"] for k, v in stats.items()}, on_epoch=True
            )
        if trainer.current_epoch + 1 == self.end_epoch:
            self.masks = self.admm.prune().attach(*trainer.optimizers)
            self.admm = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks is not None:
            self.masks.detach()
        if self.admm is not None:
            self.admm.close()

    # checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "admm": self.admm.state_dict() if self.admm is not None else None,
            "masks": self.masks.state_dict() if self.masks is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict  # the module and optimizers exist at the next epoch start

    def _restore(self, trainer, pl_module, state: dict) -> None:
        if state.get("admm") is not None:
            self.admm = self._new_admm(trainer, pl_module)
            self.admm.load_state_dict(state["admm"])
        if state.get("masks") is not None:
            self.masks = Masks.from_state_dict(pl_module, state["masks"]).attach(
                *trainer.optimizers
            )
