"""The stages of a run: one class each, driven by the runner in :mod:`admmprune.run.pipeline`.

A stage says what it builds and what happens around the runner's training epochs::

    stage.begin(opt, state)         the solver, masks, hooks for the optimizer ``opt``;
                                    from the checkpoint ``state`` when resuming in this stage
    stage.penalty()                 the ADMM whose penalty joins the loss (None: plain training)
    stage.before_epoch(epoch)       e.g. masked mapping's freeze step
    stage.on_step(epoch)            a callback after every optimizer step (or None)
    stage.end_epoch(epoch, res, opt, sched)
                                    → (entries for the epoch's metrics row, the scheduler):
                                    Z/U updates, lr resets
    stage.end()                     after the last epoch, also when the stage has none:
                                    hard pruning, hard quantization
    stage.state_dict()              top-level checkpoint entries (``{"method": …}``)

The runner owns the epoch loop, batch order, DDP, metrics rows, checkpoints, Ctrl-C and resume;
it never asks which stage it runs. A new stage is one class here and one entry in ``STAGES``.
Stages share the run's model, masks and ``info`` through ``run`` (the runner), which restores
the masks from a checkpoint before the resumed stage begins.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..solvers.admm import ADMM
from ..solvers.baselines import make_method
from ..solvers.masked_mapping import MaskedMapping
from ..solvers.oneshot.driver import oneshot
from ..weights.masks import prune
from ..weights.select import select
from .train import make_scheduler

__all__ = ["STAGES", "Compress", "Pretrain", "Quantize", "Retrain", "Stage"]


class Stage:
    """A stage of a run (see the module docstring); the defaults do nothing."""

    name = ""  # the recipe section, and the stage's name in checkpoints and metrics rows

    def __init__(self, run) -> None:
        self.run = run

    @classmethod
    def active(cls, recipe) -> bool:
        """Whether the recipe runs this stage at all."""
        return True

    @classmethod
    def describe(cls, recipe) -> str:
        """What the stage does, for ``admmprune check``."""
        return "train"

    @property
    def cfg(self):
        return getattr(self.run.r, self.name)

    @property
    def epochs(self) -> int:
        return self.cfg.epochs

    def trains(self) -> bool:
        """Whether the runner builds an optimizer and calls :meth:`begin`."""
        return self.epochs > 0

    def schedule_epochs(self) -> int:
        """The epochs one learning-rate schedule spans."""
        return self.epochs

    def begin(self, opt: torch.optim.Optimizer, state: dict | None) -> None:
        pass

    def penalty(self) -> ADMM | None:
        return None

    def before_epoch(self, epoch: int) -> None:
        pass

    def on_step(self, epoch: int) -> Callable[[int], None] | None:
        return None

    def end_epoch(self, epoch: int, res, opt, sched) -> tuple[dict, object]:
        return {}, sched

    def end(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}


def sync_solver(world, solver) -> None:
    """Rank 0's solver state on every rank (ADMM's Z, U, T; SS-Auto's Z; frozen weights)."""
    if not world.active or solver is None:
        return
    if isinstance(solver, ADMM):
        tensors = [x for st in solver._state.values() for x in st.tensors()]
    elif isinstance(solver, MaskedMapping):
        tensors = list(solver.frozen.values())
    else:
        tensors = list(solver.Z.values())
    world.broadcast(tensors)


class Pretrain(Stage):
    """Dense training; its end fixes the dense accuracy."""

    name = "pretrain"

    def end(self) -> None:
        if "dense_acc" not in self.run.info:
            ev = self.run.evaluate()
            self.run.info["dense_acc"] = ev["test_acc"]
            note_perplexity(self.run.info, "dense", ev)


class Compress(Stage):
    """The compression stage (the recipe's ``admm`` section) with its method: ADMM, a
    heuristic or SS-Auto (:mod:`admmprune.solvers.baselines`); its end is the hard prune → masks."""

    name = "admm"

    def __init__(self, run) -> None:
        super().__init__(run)
        self.method = None

    @classmethod
    def describe(cls, recipe) -> str:
        if recipe.method == "oneshot":
            o = recipe.oneshot
            return f"compress (one-shot {o.solver} from {o.samples} calibration images)"
        one_shot = recipe.method == "admm" and not recipe.admm.epochs
        return f"compress ({'one-shot projection' if one_shot else recipe.method})"

    def _lr_resets(self) -> bool:
        """The ADMM stage restarts its schedule at every Z/U update: only where the updates
        fall at epoch ends (``updates_per_epoch: 0``); otherwise one schedule spans the stage."""
        a = self.run.r.admm
        return self.run.r.method == "admm" and a.lr_reset and a.updates_per_epoch == 0

    def schedule_epochs(self) -> int:
        return self.run.r.admm.update_every if self._lr_resets() else self.epochs

    def _options(self) -> dict:
        """The method's settings from the recipe."""
        r = self.run.r
        if r.method == "ssauto":
            c = r.ssauto
            names = ("target", "by", "rho", "rho_growth", "reweight", "debias", "couple_bn",
                     "couple", "min_keep", "dual")  # fmt: skip
            kwargs = {k: getattr(c, k) for k in names}
            kwargs["example_input"] = self.run.test_inputs(1)  # MACs counted on one image
            return {"updates_per_epoch": c.updates_per_epoch, "ssauto_kwargs": kwargs}
        if r.method == "admm":
            a = r.admm
            admm_kwargs = {"rho": a.rho, "rho_growth": a.rho_growth, "rho_max": a.rho_max}
            admm_kwargs.update(mode=a.mode, groups=self.run.p.extra["groups"])
            return {
                "rounds": a.rounds,
                "update_every": a.update_every,
                "updates_per_epoch": a.updates_per_epoch,
                "admm_kwargs": admm_kwargs,
            }
        keys = {"iterative": ("cycles",), "gradual": ("prune_every", "end")}.get(r.method, ())
        return {k: getattr(r.heuristic, k) for k in keys}

    def begin(self, opt, state) -> None:
        if self.method is not None:
            return
        run = self.run
        options = self._options()
        if run.r.method == "admm":
            metric = run.r.admm.metric
            options["admm_kwargs"]["metric"] = opt if metric == "adam" else metric
            options["admm_kwargs"]["state_dtype"] = run.r.admm.state_dtype
            if state is None and run.r.admm.init == "oneshot":
                options["admm_kwargs"]["init"] = self._oneshot()  # Z⁰ = the one-shot solution
        self.method = make_method(
            run.r.method, run.model, run.p.spec, run.p.default, opt, epochs=self.epochs,
            steps_per_epoch=run.steps_per_epoch, **options,
        )  # fmt: skip
        start = (state["epoch"], state.get("method")) if state else (0, None)
        for row in self.method.start(*start):
            run.metric(stage=self.name, **row)
        if run.r.method == "admm":
            run.info["admm_state"] = _state_size(self.method.admm)

    def penalty(self):
        return self.method.admm

    def _sync(self) -> None:
        sync_solver(self.run.world, getattr(self.method, "admm", None))
        if getattr(self.method, "masks", None) is not None:
            params = self.run.model.parameters()
            self.run.world.broadcast([*self.method.masks.values(), *params])

    def on_step(self, epoch: int):
        base = epoch * self.run.steps_per_epoch

        def step(b: int) -> None:
            rows = self.method.after_step(base + b)
            for row in rows:
                self.run.metric(stage=self.name, **row)
            if rows:
                self._sync()

        return step

    def end_epoch(self, epoch, res, opt, sched):
        events = self.method.end_epoch(epoch)
        for ev in events:
            self.run.metric(stage=self.name, **ev)
        if events:
            self._sync()
        if self._lr_resets() and any(e["event"] == "update" for e in events):
            for g in opt.param_groups:  # restart the schedule from the base lr
                g["lr"] = self.cfg.optimizer.lr
            sched = make_scheduler(opt, self.cfg.schedule, self.run.r.admm.update_every)
        return {"penalty": res.penalty}, sched

    def end(self) -> None:
        """Hard prune ``W ← Π_S(W)``: the method's final masks, or a one-shot projection."""
        run = self.run
        if self.method is not None:
            masks = self.method.finish()
            self.method = None
        elif run.r.method == "oneshot":
            masks = self._oneshot()
        elif run.p.extra["groups"]:  # no compression epochs: one-shot (joint) projection
            groups = run.p.extra["groups"]
            masks = ADMM(run.model, run.p.spec, default=run.p.default, groups=groups).prune()
        else:
            masks = prune(run.model, run.p.spec, run.p.default)
        run.world.broadcast([*masks.values(), *run.model.parameters()])
        kept, total = masks.total_kept()
        after = run.evaluate()
        run.info["pruned_acc"] = after["test_acc"]
        note_perplexity(run.info, "pruned_before_retrain", after)
        run.metric(stage="prune", kept=kept, total=total, **after)
        run.log(
            f"[prune] kept {kept}/{total} constrained weights ({total / kept:.1f}x), "
            f"test acc {after['test_acc']:.4f} before retraining"
        )
        run.masks = masks

    def _oneshot(self):
        """Layer-wise reconstruction from ``oneshot.samples`` training images (seeded)."""
        run, o = self.run, self.run.r.oneshot
        images = calibration_images(run.p.data.train, o.samples, run.r.seed)
        masks = oneshot(
            run.model, run.p.spec, images.to(run.p.device).split(o.batch_size),
            solver=o.solver, sequential=o.sequential, damp=o.damp, default=run.p.default,
            dense_target=o.dense_target, min_expert_tokens=o.min_expert_tokens,
            **o.options,
        )  # fmt: skip
        rep = masks.report
        run.info["oneshot"] = {k: v for k, v in rep.as_dict().items() if k != "layers"}
        run.metric(stage=self.name, event="oneshot", samples=rep.samples, error=rep.error,
                   seconds=rep.seconds, gram_bytes_peak=rep.gram_bytes_peak,
                   layers={n: r.rel_error for n, r in rep.layers.items()})  # fmt: skip
        run.log(f"[oneshot] {rep.summary()}")
        return masks

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict() if self.method is not None else None}


def calibration_images(dataset, samples: int, seed: int) -> torch.Tensor:
    """``samples`` images of ``dataset`` drawn without replacement by ``seed``, un-augmented."""
    n = len(dataset)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(samples, n)]
    if hasattr(dataset, "subset") and hasattr(dataset, "batch"):
        part = dataset.subset(idx)
        part.augment = False  # the subset's own attribute: training keeps its augmentation
        return part.batch(torch.arange(len(part)))[0]
    return torch.stack([dataset[int(i)][0] for i in idx])


class Retrain(Stage):
    """Masked retraining: the pruned weights stay exactly zero."""

    name = "retrain"

    def trains(self) -> bool:
        return True  # the masks attach even with no retraining epochs

    def begin(self, opt, state) -> None:
        self.run.masks.attach(opt)


class Quantize(Stage):
    """ADMM quantization of the kept weights (or the authors' masked mapping); its end puts
    every kept weight on its level."""

    name = "quantize"

    def __init__(self, run) -> None:
        super().__init__(run)
        self.quant: ADMM | MaskedMapping | None = None

    @classmethod
    def active(cls, recipe) -> bool:
        return bool(recipe.quantize.layers)

    @classmethod
    def describe(cls, recipe) -> str:
        return f"quantize ({recipe.quantize.method})"

    def _quantizer(self) -> ADMM | MaskedMapping:
        """ADMM on the quantization sets, projecting only the weights the masks keep (or the
        authors' masked mapping)."""
        run, q = self.run, self.run.r.quantize
        spec = run.r.quantize_spec()
        support = {
            t.name: run.masks[t.name]
            if t.name in run.masks
            else torch.ones_like(t.param, dtype=torch.bool)
            for t in select(run.model, spec)
        }
        if q.method == "masked_mapping":
            return MaskedMapping(run.model, spec, support=support, share=q.mapping_share)
        return ADMM(run.model, spec, support=support, rho=q.rho, rho_growth=q.rho_growth)

    def begin(self, opt, state) -> None:
        self.run.masks.attach(opt)
        self.quant = self._quantizer()
        if isinstance(self.quant, MaskedMapping):
            self.quant.attach(opt)
        if state is not None and state.get("quant") is not None:
            self.quant.load_state_dict(state["quant"])

    def penalty(self):
        return self.quant if isinstance(self.quant, ADMM) else None

    def before_epoch(self, epoch: int) -> None:
        if isinstance(self.quant, MaskedMapping):
            while self.quant.steps < epoch + 1:  # idempotent when resuming mid-epoch
                self.run.metric(stage=self.name, event="freeze", frozen=self.quant.step())

    def on_step(self, epoch: int):
        if not isinstance(self.quant, ADMM):
            return None
        every = max(1, self.run.steps_per_epoch // self.cfg.updates_per_epoch)

        def step(b: int) -> None:
            if b % every == 0:
                layers = self.quant.update()
                self.run.metric(stage=self.name, event="update", layers=layers)
                sync_solver(self.run.world, self.quant)

        return step

    def end(self) -> None:
        """``W ← Π_S(W)`` on the quantization sets: every kept weight lands on a level."""
        run = self.run
        if self.quant is None:  # no quantize epochs: one-shot nearest levels
            run.masks.detach()
            self.quant = self._quantizer()
        if isinstance(self.quant, MaskedMapping):
            self.quant.finish()
        else:
            self.quant.prune()
        self.quant = None
        after = run.evaluate()
        run.info["quantized_acc"] = after["test_acc"]
        note_perplexity(run.info, "quantized", after)
        run.metric(stage=self.name, event="hard_quantize", **after)
        run.log(f"[quantize] weights on their levels, test acc {after['test_acc']:.4f}")

    def state_dict(self) -> dict:
        return {"quant": self.quant.state_dict() if self.quant is not None else None}


#: the stages of every run, in order (their positions seed the batch order: append new ones)
STAGES: tuple[type[Stage], ...] = (Pretrain, Compress, Retrain, Quantize)


def _state_size(admm: ADMM) -> dict:
    """What the ADMM state costs next to the weights it constrains (summary.json)."""
    weights = sum(t.param.numel() for t in admm.targets)
    size = admm.state_bytes()
    return {"dtype": admm.state_dtype, "bytes": size,
            "bytes_per_constrained_weight": size / max(weights, 1)}  # fmt: skip


def note_perplexity(info: dict, when: str, ev: dict) -> None:
    """A language model's held-out perplexity at ``when`` (summary.json's ``perplexity``)."""
    if "test_perplexity" in ev:
        info.setdefault("perplexity", {})[when] = ev["test_perplexity"]
