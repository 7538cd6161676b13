"""A recipe's run: pretrain → ADMM → hard prune → masked retrain (→ ADMM quantization → hard
quantize) → compact → report, resumable.

Everything that can be wrong with a recipe (model, data, checkpoint, constraint spec) is checked
in :func:`prepare`, before the run dir is created, so a bad recipe leaves nothing behind.

A checkpoint is written atomically at every epoch boundary (and, on Ctrl-C, after the batch in
flight): model, optimizer, scheduler, ADMM Z/U/rho, masks, RNG state, and the position
(stage, epoch, batch). ``resume`` continues from it exactly: batch order is a function of
(seed, stage, epoch), so the resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from ._io import atomic_save, safe_load
from .accounting import storage
from .admm import ADMM, GROUP_COMBINABLE
from .baselines import make_method
from .compact import compact, zero_dead_inputs
from .compressed import export_compressed
from .config import DATA_LOCATION, Recipe, RecipeError, differing_keys
from .data import DataBundle, load_data
from .distributed import World, shard_order
from .groups import channel_groups
from .latency import measure_paired
from .masks import Masks, prune
from .models import build_model
from .plots import write_plots
from .quantization import MaskedMapping
from .report import layer_table, summarize
from .select import select
from .train import (
    batch_order,
    evaluate,
    make_optimizer,
    make_scheduler,
    resolve_device,
    train_epoch,
)

__all__ = ["Interrupted", "Prepared", "plan", "prepare", "run"]

STAGES = ("pretrain", "admm", "retrain", "quantize")
_CKPT = "checkpoint.pt"
_FORMAT = "admmprune.checkpoint"


class Interrupted(Exception):  # noqa: N818 (a state, not an error)
    """The run stopped on Ctrl-C after saving a checkpoint; ``--resume`` continues it."""


@dataclass
class Prepared:
    recipe: Recipe
    run_dir: Path
    data: DataBundle
    model: nn.Module
    device: torch.device
    spec: dict
    default: object
    resume_state: dict | None = None
    extra: dict = field(default_factory=dict)
    #: the exact command that continues this run after Ctrl-C (the CLI fills it in)
    continue_command: str | None = None

    def resume_hint(self) -> str:
        return self.continue_command or (
            f"admmprune run RECIPE --output-dir {self.run_dir} --resume"
        )


def _recipe_dump(recipe: Recipe) -> dict:
    return recipe.model_dump(mode="json")


def _load_start_weights(model: nn.Module, path: str) -> None:
    state = safe_load(path, "model checkpoint")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise RecipeError(f"model.checkpoint {path!r} holds no state_dict.")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise RecipeError(f"model.checkpoint {path!r} does not fit the model: {first}") from None


def prepare(
    recipe: Recipe, *, resume: bool = False, force: bool = False, data: DataBundle | None = None
) -> Prepared:
    """Check everything and build model and data; creates nothing on disk.

    ``data``: an already loaded bundle to use instead of the recipe's ``data`` section (runs
    side by side on the very same tensors; the recipe's batch sizes still apply).
    """
    run_dir = Path(recipe.output_dir)
    if resume and force:
        raise RecipeError("--resume and --force contradict each other; choose one.")
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"output_dir {str(run_dir)!r} exists and is not a folder.")
    existing = run_dir.is_dir() and any(run_dir.iterdir())
    if existing and not (resume or force):
        raise RecipeError(
            f"output_dir {str(run_dir)!r} is not empty; pass --resume to continue that run, "
            "--force to delete it and start over, or choose another output_dir."
        )
    world = World()
    if world.active and recipe.data.batch_size % world.size:
        raise RecipeError(
            f"data.batch_size {recipe.data.batch_size} does not split over {world.size} "
            f"processes; use a multiple of {world.size} (it is the global batch)."
        )
    resume_state = _load_resume_state(run_dir, recipe) if resume else None
    if recipe.logging.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise RecipeError(
                "logging.tensorboard needs the tensorboard extra: "
                "pip install 'admmprune[tensorboard]' (or set logging.tensorboard: false)."
            ) from None
    try:
        device = resolve_device(recipe.device)
        d = recipe.data
        data = data or load_data(
            d.name,
            data_dir=d.dir,
            path=d.path,
            download=d.download,
            augment=d.augment,
            val_size=d.val_size,
            image_size=d.image_size,
            seed=recipe.seed,
        )
        torch.manual_seed(recipe.seed)
        model = build_model(
            recipe.model.name,
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            input_size=data.input_size,
            kwargs=recipe.model.kwargs,
        )
        if recipe.model.checkpoint:
            _load_start_weights(model, recipe.model.checkpoint)
        fingerprint = data.fingerprint()
        if resume_state is not None:
            _same_data(run_dir, resume_state, recipe, fingerprint)
        spec, default = recipe.spec()
        constraint_names, combinable = {}, set()
        if spec or default is not None:  # unmatched / conflicting / wrong-rank keys fail here
            for t in select(model, spec, default):
                constraint_names[t.name] = repr(t.constraint)
                if isinstance(t.constraint, GROUP_COMBINABLE):
                    combinable.add(t.name)  # may also sit in a channel group (filter + column)
        groups = []
        for c in recipe.coupled():
            x1 = data.test.batch(torch.arange(1))[0]
            new = channel_groups(model, x1, c.keep, layers=c.layers, norm=c.norm)
            if not new:
                raise RecipeError(
                    f"coupled_channels layers {c.layers!r} matches no channel group; use a glob "
                    "on layer names, e.g. 'layer3*' (the output layer is never pruned)."
                )
            groups += new
            for g in new:
                for pname, _ in g.members:
                    if pname in combinable:
                        combinable.discard(pname)  # one group per parameter
                        constraint_names[pname] = f"{g!r} & {constraint_names[pname]}"
                        continue
                    if pname in constraint_names:
                        raise RecipeError(
                            f"{pname!r} is in coupled_channels group {g.name!r} and also in "
                            "constraints or an earlier coupled_channels entry; constrain each "
                            "parameter once (only a columns or unstructured constraint may "
                            "sit on top of a channel group: filter + column)."
                        )
                    constraint_names[pname] = repr(g)
        quant_names = {}
        if recipe.quantize.layers:
            quant_names = {
                t.name: repr(t.constraint) for t in select(model, recipe.quantize_spec())
            }
    except RecipeError:
        raise
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    extra = {
        "groups": groups,
        "constraint_names": constraint_names,
        "quant_names": quant_names,
        "data_fingerprint": fingerprint,
    }
    model = model.to(device)
    return Prepared(recipe, run_dir, data, model, device, spec, default, resume_state, extra)


def _load_resume_state(run_dir: Path, recipe: Recipe) -> dict:
    """The run's checkpoint, verified, for a recipe that computes the same run."""
    ckpt = run_dir / _CKPT
    if not ckpt.is_file():
        raise RecipeError(f"--resume: no checkpoint at {str(ckpt)!r}; start without --resume.")
    try:
        state = safe_load(ckpt, "run checkpoint")
    except ValueError as exc:
        raise RecipeError(f"--resume: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise RecipeError(f"{str(ckpt)!r} is not an admmprune run checkpoint.")
    diff = differing_keys(state["recipe"], _recipe_dump(recipe))
    if diff:
        raise RecipeError(
            f"the recipe differs from the one {str(run_dir)!r} was started with, in: "
            f"{'; '.join(diff)}. Resume with the recipe saved in "
            f"{str(run_dir / 'recipe.yaml')!r}, or use --force to delete the run and start over."
        )
    return state


def _same_data(run_dir: Path, state: dict, recipe: Recipe, fingerprint: str) -> None:
    """A run resumes from another data folder only if it holds the very same data."""
    saved = differing_keys(state["recipe"], _recipe_dump(recipe), ignore=())
    moved = [d for d in saved if d.split(" ")[0] in DATA_LOCATION]
    if moved and state.get("data_fingerprint") != fingerprint:
        raise RecipeError(
            f"{'; '.join(moved)}: the data there is not the data {str(run_dir)!r} was started "
            "with (different images or labels); point it at the original data, or use --force."
        )


class _StopFlag:
    """First Ctrl-C: finish the batch, save, exit. Second Ctrl-C: the usual KeyboardInterrupt."""

    def __init__(self) -> None:
        self.stop = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not in the main thread: no handler
            self._old = None
        return self

    def _handle(self, *_):
        self.stop = True
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class _Run:
    def __init__(self, p: Prepared, log=print) -> None:
        self.world = World()
        self.p, self.r = p, p.recipe
        self.log = log if self.world.main else (lambda *a, **k: None)  # rank 0 alone speaks
        self.dir = p.run_dir
        self._ddp = None
        self.model = p.model
        self.method = None  # the compression stage's method (ADMM or a heuristic)
        self.masks: Masks | None = None
        self.quant: ADMM | MaskedMapping | None = None  # the quantize stage's method
        self.info: dict = {"times": {}}
        self.metrics_lines = 0
        self._clock = time.perf_counter()  # stage time counted up to here
        self._started = (time.perf_counter(), 0)  # this process's start: time, batches done
        self._tb = None  # TensorBoard writer (logging.tensorboard)

    # files -------------------------------------------------------------------------------------
    def metric(self, **row) -> None:
        if not self.world.main:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.metrics_lines += 1
        if self.r.logging.tensorboard:
            self._tensorboard(row)

    def _tensorboard(self, row: dict) -> None:
        """Every numeric scalar of a metrics row, tagged ``stage/event/key`` (nested dicts such
        as per-layer values flatten to ``stage/event/key/layer``), step = the row's number."""
        from .config import flatten

        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        stage, event = row.get("stage", "run"), row.get("event", "epoch")
        for key, value in flatten(row).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{stage}/{event}/{key.replace('.', '/')}", value,
                                    self.metrics_lines)  # fmt: skip
        self._tb.flush()

    def _tick(self, stage: str) -> None:
        """Add the time since the last tick to the stage's seconds (saved with checkpoints, so
        a resumed run's seconds count every session)."""
        now = time.perf_counter()
        times = self.info["times"]
        times[stage] = times.get(stage, 0.0) + now - self._clock
        self._clock = now

    def _truncate_metrics(self, lines: int) -> None:
        if not self.world.main:
            return
        path = self.dir / "metrics.jsonl"
        kept = path.read_text().splitlines(keepends=True)[:lines] if path.exists() else []
        path.write_text("".join(kept))
        self.metrics_lines = len(kept)

    def save(self, stage: str, epoch: int, batch: int, opt, sched, sums=None) -> None:
        self._tick(stage)
        if not self.world.main:
            return
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        atomic_save(
            {
                "format": _FORMAT,
                "version": 1,
                "recipe": _recipe_dump(self.r),
                "stage": stage,
                "epoch": epoch,
                "batch": batch,
                "model": self.model.state_dict(),
                "optimizer": opt.state_dict() if opt is not None else None,
                "scheduler": sched.state_dict() if sched is not None else None,
                "method": self.method.state_dict() if self.method is not None else None,
                "masks": self.masks.state_dict() if self.masks is not None else None,
                "quant": self.quant.state_dict() if self.quant is not None else None,
                "rng": rng,
                "metrics_lines": self.metrics_lines,
                "info": self.info,
                "epoch_sums": sums,  # the interrupted epoch's running loss/accuracy sums
                "data_fingerprint": self.p.extra["data_fingerprint"],
            },
            self.dir / _CKPT,
        )

    # stages ------------------------------------------------------------------------------------
    def _evaluate(self) -> dict:
        bs, amp = self.r.data.eval_batch_size, self.r.amp
        acc, loss = evaluate(self.model, self.p.data.test, self.p.device, bs, amp)
        out = {"test_acc": acc, "test_loss": loss}
        if self.p.data.val is not None:
            out["val_acc"], out["val_loss"] = evaluate(
                self.model, self.p.data.val, self.p.device, bs, amp
            )
        return out

    def _lr_resets(self) -> bool:
        """The ADMM stage restarts its schedule at every Z/U update: only where the updates
        fall at epoch ends (``updates_per_epoch: 0``); otherwise one schedule spans the stage."""
        a = self.r.admm
        return self.r.method == "admm" and a.lr_reset and a.updates_per_epoch == 0

    def _stage_objects(self, stage: str, cfg):
        opt = make_optimizer(self.model.parameters(), cfg.optimizer)
        if stage == "admm" and self._lr_resets():
            sched = make_scheduler(opt, cfg.schedule, self.r.admm.update_every)
        else:
            sched = make_scheduler(opt, cfg.schedule, cfg.epochs)
        return opt, sched

    def _begin_stage(self, stage: str, state: dict | None):
        """Build the stage's optimizer, scheduler, ADMM or masks; from ``state`` when resuming."""
        cfg = getattr(self.r, stage)
        opt, sched = self._stage_objects(stage, cfg)
        if stage == "admm" and self.method is None:
            a = self.r.admm
            options = (
                self._method_options()
                if self.r.method == "ssauto"
                else (
                    {
                        "rounds": a.rounds,
                        "update_every": a.update_every,
                        "updates_per_epoch": a.updates_per_epoch,
                        "admm_kwargs": {
                            "rho": a.rho,
                            "rho_growth": a.rho_growth,
                            "rho_max": a.rho_max,
                            "mode": a.mode,
                            "groups": self.p.extra["groups"],
                        },
                    }
                    if self.r.method == "admm"
                    else {
                        k: v
                        for k, v in self.r.heuristic.model_dump().items()
                        if k
                        in {"iterative": ("cycles",), "gradual": ("prune_every", "end")}.get(
                            self.r.method, ()
                        )
                    }
                )
            )
            self.method = make_method(
                self.r.method,
                self.model,
                self.p.spec,
                self.p.default,
                opt,
                epochs=cfg.epochs,
                steps_per_epoch=self._steps_per_epoch(),
                **options,
            )
            start = (state["epoch"], state.get("method")) if state else (0, None)
            for row in self.method.start(*start):
                self.metric(stage="admm", **row)
        if stage == "retrain":
            if state is not None and state.get("masks") is not None:
                self.masks = Masks.from_state_dict(self.model, state["masks"])
            elif self.masks is None:
                self.masks = self._hard_prune()
            self.masks.attach(opt)
        if stage == "quantize":
            if state is not None and state.get("masks") is not None:
                self.masks = Masks.from_state_dict(self.model, state["masks"])
            self.masks.attach(opt)
            self.quant = self._quantizer()
            if isinstance(self.quant, MaskedMapping):
                self.quant.attach(opt)
            if state is not None and state.get("quant") is not None:
                self.quant.load_state_dict(state["quant"])
        if state is not None and state.get("optimizer") is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if self.masks is not None:
                self.masks.attach(opt)  # re-zero the loaded optimizer state off the support
        return opt, sched

    def _method_options(self) -> dict:
        """SS-Auto's settings; MACs are counted on one test image."""
        c = self.r.ssauto
        x1 = self._test_inputs(1)
        return {
            "updates_per_epoch": c.updates_per_epoch,
            "ssauto_kwargs": {
                "target": c.target,
                "by": c.by,
                "example_input": x1,
                "rho": c.rho,
                "rho_growth": c.rho_growth,
                "reweight": c.reweight,
                "debias": c.debias,
                "couple_bn": c.couple_bn,
                "min_keep": c.min_keep,
                "dual": c.dual,
            },
        }

    def _quantizer(self) -> ADMM | MaskedMapping:
        """ADMM on the quantization sets, projecting only the weights the masks keep (or the
        authors' masked mapping)."""
        q = self.r.quantize
        spec = self.r.quantize_spec()
        support = {
            t.name: self.masks[t.name]
            if t.name in self.masks
            else torch.ones_like(t.param, dtype=torch.bool)
            for t in select(self.model, spec)
        }
        if q.method == "masked_mapping":
            return MaskedMapping(self.model, spec, support=support, share=q.mapping_share)
        return ADMM(self.model, spec, support=support, rho=q.rho, rho_growth=q.rho_growth)

    def _hard_quantize(self) -> None:
        """``W ← Π_S(W)`` on the quantization sets: every kept weight lands on a level."""
        if self.quant is None:  # no quantize epochs: one-shot nearest levels
            self.masks.detach()
            self.quant = self._quantizer()
        if isinstance(self.quant, MaskedMapping):
            self.quant.finish()
        else:
            self.quant.prune()
        self.quant = None
        after = self._evaluate()
        self.info["quantized_acc"] = after["test_acc"]
        self.metric(stage="quantize", event="hard_quantize", **after)
        self.log(f"[quantize] weights on their levels, test acc {after['test_acc']:.4f}")

    # ranks -----------------------------------------------------------------------------------
    def _train_model(self) -> nn.Module:
        """The model the training steps run: under DDP when distributed (built on first use,
        after any resume has loaded the weights; DDP broadcasts rank 0's weights)."""
        if not self.world.active:
            return self.model
        if self._ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            dev = self.p.device
            ids = [dev.index] if dev.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.model, device_ids=ids)
        return self._ddp

    def _any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a Ctrl-C stops all ranks together)."""
        if not self.world.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def _sync_admm(self, solver) -> None:
        """Rank 0's solver state on every rank (ADMM's Z, U, T; SS-Auto's Z; frozen weights)."""
        if not self.world.active or solver is None:
            return
        if isinstance(solver, ADMM):
            tensors = [x for st in solver._state.values() for x in (st.Z, st.U, st.T)]
        elif isinstance(solver, MaskedMapping):
            tensors = list(solver.frozen.values())
        else:
            tensors = list(solver.Z.values())
        self.world.broadcast(tensors)

    def _sync_method(self) -> None:
        self._sync_admm(getattr(self.method, "admm", None))
        if getattr(self.method, "masks", None) is not None:
            self.world.broadcast([*self.method.masks.values(), *self.model.parameters()])

    def _admm_of(self, stage: str) -> ADMM | None:
        """The ADMM whose penalty joins the loss in ``stage`` (None: plain training)."""
        if stage == "admm":
            return self.method.admm
        return self.quant if stage == "quantize" and isinstance(self.quant, ADMM) else None

    def _steps_per_epoch(self) -> int:
        return _steps_per_epoch(self.p)

    def _hard_prune(self) -> Masks:
        if self.method is not None:
            masks = self.method.finish()
            self.method = None
        elif self.p.extra["groups"]:  # no compression epochs: one-shot (joint) projection
            groups = self.p.extra["groups"]
            masks = ADMM(self.model, self.p.spec, default=self.p.default, groups=groups).prune()
        else:
            masks = prune(self.model, self.p.spec, self.p.default)
        self.world.broadcast([*masks.values(), *self.model.parameters()])
        kept, total = masks.total_kept()
        after = self._evaluate()
        self.info["pruned_acc"] = after["test_acc"]
        self.metric(stage="prune", kept=kept, total=total, **after)
        self.log(
            f"[prune] kept {kept}/{total} constrained weights ({total / kept:.1f}x), "
            f"test acc {after['test_acc']:.4f} before retraining"
        )
        return masks

    def run(self) -> dict:
        st = self.p.resume_state
        start_stage = STAGES.index(st["stage"]) if st else 0
        if st:
            self.model.load_state_dict(st["model"])
            self.info = st["info"]
            self._truncate_metrics(st["metrics_lines"])
            torch.set_rng_state(st["rng"]["torch"])
            if "cuda" in st["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(st["rng"]["cuda"])
            self.log(
                f"resuming {self.dir}: {_position(self.p, st['stage'], st['epoch'], st['batch'])}"
            )
        else:
            self.info["start_acc"] = self._evaluate()["test_acc"]
        with _StopFlag() as flag:
            for si in range(start_stage, len(STAGES)):
                stage = STAGES[si]
                here = st if (st and si == start_stage) else None
                self._run_stage(si, stage, here, flag)
        return self._finish()

    def _run_stage(self, si: int, stage: str, state: dict | None, flag: _StopFlag) -> None:
        cfg = getattr(self.r, stage)
        if stage == "quantize" and not self.r.quantize.layers:
            return
        if stage == "retrain" or cfg.epochs > 0:
            opt, sched = self._begin_stage(stage, state)
        else:
            opt = sched = None
        epoch = state["epoch"] if state else 0
        batch = state["batch"] if state else 0
        carry = state.get("epoch_sums") if state and batch else None
        self._clock = time.perf_counter()
        while epoch < cfg.epochs:
            on_step = None
            if stage == "admm":
                base = epoch * self._steps_per_epoch()

                def on_step(b, base=base):
                    rows = self.method.after_step(base + b)
                    for row in rows:
                        self.metric(stage="admm", **row)
                    if rows:
                        self._sync_method()

            elif stage == "quantize" and isinstance(self.quant, MaskedMapping):
                while self.quant.steps < epoch + 1:  # idempotent when resuming mid-epoch
                    self.metric(stage="quantize", event="freeze", frozen=self.quant.step())
            elif stage == "quantize":
                every = max(1, self._steps_per_epoch() // self.r.quantize.updates_per_epoch)

                def on_step(b, every=every):
                    if b % every == 0:
                        layers = self.quant.update()
                        self.metric(stage="quantize", event="update", layers=layers)
                        self._sync_admm(self.quant)

            w = self.world
            order = batch_order(len(self.p.data.train), self.r.seed, si, epoch)
            res = train_epoch(
                self._train_model(),
                self.p.data.train,
                opt,
                order=shard_order(order, self.r.data.batch_size, w.rank, w.size),
                batch_size=self.r.data.batch_size // w.size,
                device=self.p.device,
                start_batch=batch,
                admm=self._admm_of(stage),
                amp=self.r.amp,
                num_workers=self.r.data.num_workers,
                progress=self.r.progress,
                desc=f"{stage} {epoch + 1}/{cfg.epochs}",
                should_stop=lambda: self._any(flag.stop),
                on_step=on_step,
                carry=carry,
                status=self._eta(si, epoch),
            )
            if res.interrupted:
                self.save(stage, epoch, res.batches, opt, sched, sums=res.sums)
                self._interrupted(stage, epoch, res.batches)
            batch, carry = 0, None
            epoch += 1
            row = {
                "stage": stage,
                "epoch": epoch,
                "train_loss": res.loss,
                "train_acc": res.accuracy,
                "lr": opt.param_groups[0]["lr"],
            }
            sched.step()
            if stage == "admm":
                row["penalty"] = res.penalty
                events = self.method.end_epoch(epoch)
                for ev in events:
                    self.metric(stage="admm", **ev)
                if events:
                    self._sync_method()
                if self._lr_resets() and any(e["event"] == "update" for e in events):
                    for g in opt.param_groups:  # restart the schedule from the base lr
                        g["lr"] = self.r.admm.optimizer.lr
                    sched = make_scheduler(opt, cfg.schedule, self.r.admm.update_every)
            row.update(self._evaluate())
            self.metric(**row)
            self.log(
                f"[{stage} {epoch}/{cfg.epochs}] loss {res.loss:.4f} train acc {res.accuracy:.4f} "
                f"test acc {row['test_acc']:.4f}"
                + (f" penalty {res.penalty:.3g}" if stage == "admm" else "")
                + f" ({self._eta(si, epoch)(0)})"
            )
            self.save(stage, epoch, 0, opt, sched)
            if flag.stop:
                self._interrupted(stage, epoch, 0)
        self._tick(stage)
        if stage == "pretrain":
            self.info.setdefault("dense_acc", self._evaluate()["test_acc"])
        if stage == "retrain" and cfg.epochs == 0:
            self.save(stage, 0, 0, opt, sched)
        if stage == "quantize":
            self._hard_quantize()

    def _interrupted(self, stage: str, epoch: int, batch: int):
        raise Interrupted(
            f"interrupted {'in ' if batch else ''}{_position(self.p, stage, epoch, batch)}; "
            f"checkpoint saved in {self.dir}. Continue with: {self.p.resume_hint()}"
        )

    def _planned_batches(self) -> list[int]:
        """Batches each stage trains, in STAGES order."""
        spe = self._steps_per_epoch()
        out = []
        for stage in STAGES:
            off = stage == "quantize" and not self.r.quantize.layers
            out.append(0 if off else getattr(self.r, stage).epochs * spe)
        return out

    def _eta(self, si: int, epoch: int) -> Callable[[int], str]:
        """``status(b)`` for the progress bar: the whole run's time left at this pace."""
        plan = self._planned_batches()
        before = sum(plan[:si]) + epoch * self._steps_per_epoch()
        total = sum(plan)
        t0, done0 = self._started

        def status(b: int) -> str:
            done = before + b
            rate = (time.perf_counter() - t0) / max(done - done0, 1)
            return f"ETA {_duration(rate * (total - done))}"

        return status

    def _test_inputs(self, n: int) -> torch.Tensor:
        """The first ``n`` test inputs (fewer if the test set is smaller), on the run's device."""
        test = self.p.data.test
        return test.batch(torch.arange(min(n, len(test))))[0].to(self.p.device)

    def _compact(self) -> dict:
        """Remove the zero channel groups; MACs, parameters and measured latency before/after.

        The compact model is not pickled: rebuild it from ``model.pt`` with :func:`compact`.
        """
        x = self._test_inputs(1)
        small, report = compact(self.model, x)
        xb = self._test_inputs(64)

        # timed as deployed (see latency.py): BN folded where torch.fx can trace the model,
        # conv nets in NHWC; in alternation, so that a busy machine slows both alike
        models, channels_last = {"dense": self.model, "compact": small}, xb.ndim == 4
        try:
            fold_bn = True
            t = measure_paired(models, xb, 10, fold_bn=True, channels_last=channels_last)
        except ValueError:  # torch.fx cannot trace this model
            fold_bn = False
            t = measure_paired(models, xb, 10, channels_last=channels_last)
        return {
            "channels_removed": sum(report.removed.values()),
            "zero_channels_not_removable": report.total_not_removable,
            "macs_dense": report.macs_before,
            "macs_compact": report.macs_after,
            "mac_reduction": report.mac_reduction,
            "macs_compact_sparse": report.sparse_macs_after,  # zero weights (e.g. columns) skipped
            "params_compact": report.params_after,
            "latency_batch": xb.shape[0],
            "latency_threads": torch.get_num_threads(),
            "latency_channels_last": channels_last,
            "latency_bn_folded": fold_bn,
            "latency_dense_ms": t["dense"],
            "latency_compact_ms": t["compact"],
            "speedup": t["dense"] / t["compact"],
        }

    def _storage(self) -> dict:
        """Storage accounting, and the packed file (``model.admmprune``) with its real size."""
        s = storage(self.model)
        d = self.p.data
        spec = {
            "name": self.r.model.name,
            "num_classes": d.num_classes,
            "in_channels": d.in_channels,
            "input_size": d.input_size,
            "kwargs": self.r.model.kwargs,
        }
        nbytes = export_compressed(self.model, self.dir / "model.admmprune", spec)
        return {
            "model_spec": spec,
            "total_raw_bits": s["total_raw"],
            "total_bits": s["total_bits"],
            "rate": s["total_raw"] / s["total_bits"],
            "weights_raw_bits": s["weights_raw"],
            "weights_bits": s["weights_bits"],
            "weights_rate": s["weights_raw"] / s["weights_bits"],
            "weights_rate_without_index": s["weights_raw"] / max(s["weights_value_bits"], 1),
            "weights_index_bits": s["weights_index_bits"],
            "index_bound_bits": s["index_bound_bits"],
            "file_bytes": nbytes,
            "formats": {k: v["format"] for k, v in s["layers"].items()},
            "distinct_values": {
                name: int(p.detach().unique().numel())
                for name, p in self.model.named_parameters()
                if name in self.p.extra["quant_names"]
            },
        }

    def _finish(self) -> dict:
        dead = 0
        if self.r.compact:
            # a removed channel's consumer weights are stored (and counted) as zeros; the
            # model's function is unchanged, so the accuracy below is measured after
            dead = zero_dead_inputs(self.model, self._test_inputs(1))
        final = self._evaluate()
        self.masks.detach()
        agree = self.world.all_equal([*self.masks.values(), *self.model.parameters()])
        if not agree:
            raise RuntimeError("ranks disagree on the final masks or weights; please report it.")
        if not self.world.main:
            return summarize(self.model, self.p.extra["constraint_names"], self.r, self.info, final)
        atomic_save(self.model.state_dict(), self.dir / "model.pt")
        self.masks.save(self.dir / "masks.pt")
        names = self.p.extra["constraint_names"]
        summary = summarize(self.model, names, self.r, self.info, final)
        if self.r.compact:
            summary["compact"] = {**self._compact(), "dead_input_weights_zeroed": dead}
        summary["storage"] = self._storage()
        if self.world.active:
            summary["distributed"] = {
                "world_size": self.world.size,
                "backend": self.world.backend,
                "masks_and_weights_identical_on_all_ranks": agree,
            }
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        (self.dir / "layers.md").write_text(layer_table(summary) + "\n")
        write_plots(self.dir, summary)
        return summary


def plan(p: Prepared) -> str:
    """What :func:`run` would do with ``p``, for people (``admmprune check``)."""
    r, d = p.recipe, p.data
    val = f", {len(d.val):,} validation" if d.val is not None else ""
    lines = [
        f"recipe OK: model {r.model.name} on {r.data.name} ({len(d.train):,} training, "
        f"{len(d.test):,} test images{val}; {d.num_classes} classes), device {p.device}, "
        f"seed {r.seed}",
        "run dir: "
        + (
            f"{p.run_dir} (resumes: {_position(p, *_at(p))})"
            if p.resume_state
            else f"{p.run_dir} ({'replaced: --force' if p.run_dir.exists() else 'new'})"
        ),
        "stages:",
    ]
    method = r.method if r.method != "admm" or r.admm.epochs else "one-shot projection"
    for stage in STAGES:
        cfg = getattr(r, stage)
        if stage == "quantize" and not r.quantize.layers:
            continue
        what = {"admm": f"compress ({method})", "quantize": f"quantize ({r.quantize.method})"}
        lines.append(
            f"  {stage:<9} {cfg.epochs:>3} epochs  {what.get(stage, 'train')}, "
            f"{cfg.optimizer.name} lr {cfg.optimizer.lr:g}, {cfg.schedule.name} schedule"
        )
    lines.append("  then: hard prune" + (", compact" if r.compact else "") + ", storage, report")
    names = p.extra["constraint_names"]
    lines.append(f"constrained layers ({len(names)}):")
    lines += [f"  {name:<30} {what}" for name, what in names.items()]
    if p.extra["quant_names"]:
        lines.append(f"quantized layers ({len(p.extra['quant_names'])}):")
        lines += [f"  {name:<30} {what}" for name, what in p.extra["quant_names"].items()]
    lines.append("nothing was written.")
    return "\n".join(lines)


def _steps_per_epoch(p: Prepared) -> int:
    return -(-len(p.data.train) // p.recipe.data.batch_size)


def _position(p: Prepared, stage: str, epoch: int, batch: int) -> str:
    """Where a checkpoint stands, for people: epochs and batches counted from 1."""
    epochs, steps = getattr(p.recipe, stage).epochs, _steps_per_epoch(p)
    if batch:
        return f"{stage} epoch {epoch + 1}/{epochs}, after batch {batch}/{steps}"
    if epoch == 0:
        return f"the start of {stage}"
    return f"after {stage} epoch {epoch}/{epochs}"


def _at(p: Prepared) -> tuple[str, int, int]:
    st = p.resume_state
    return st["stage"], st["epoch"], st["batch"]


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def run(prepared: Prepared, log=print) -> dict:
    """Run (or resume) a prepared recipe; returns the summary written to ``summary.json``.

    Under torchrun every rank calls this after :func:`prepare`; rank 0 alone writes.
    """
    p = prepared
    world = World()
    world.init(p.device)
    world.barrier()  # every rank has checked the run dir before rank 0 touches it
    if p.resume_state is None and world.main:
        if p.run_dir.exists():
            shutil.rmtree(p.run_dir)  # only reached with --force (prepare refused otherwise)
        p.run_dir.mkdir(parents=True)
        (p.run_dir / "recipe.yaml").write_text(
            yaml.safe_dump(_recipe_dump(p.recipe), sort_keys=False)
        )
    world.barrier()
    return _Run(p, log).run()
