"""The runner of an image recipe: the epoch loop over the stages of :mod:`.stages`, batch order,
DDP, metrics rows, atomic checkpoints, resume, Ctrl-C with the exact continue command, ETA,
TensorBoard, then the finishing steps of :mod:`.finish`; no stage names in it."""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_save
from ..structure.compact import zero_dead_inputs
from ..weights.masks import Masks
from .config import Recipe
from .data import DataBundle
from .distributed import World, shard_order
from .finish import compact_stats, model_spec, storage_stats, write_run_files
from .parse import flatten
from .report import summarize
from .rundir import CHECKPOINT, CHECKPOINT_FORMAT, recipe_dump
from .stages import STAGES, note_perplexity
from .train import (
    batch_order,
    evaluate,
    make_optimizer,
    make_scheduler,
    train_epoch,
)

__all__ = ["Interrupted", "Prepared"]


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
    #: the finishing steps of this kind of run (``_Run -> summary``; language models:
    #: :func:`admmprune.run.lm_train.finish`); ``None``: the image run's, below
    finish: Callable | None = None

    def resume_hint(self) -> str:
        return self.continue_command or (
            f"admmprune run RECIPE --output-dir {self.run_dir} --resume"
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
    """The runner: the epoch loop, batch order, DDP, metrics rows, checkpoints, Ctrl-C and
    resume, written once for every stage (:mod:`admmprune.run.stages`), then the finishing steps
    (:mod:`admmprune.run.finish`)."""

    def __init__(self, p: Prepared, log=print, stages=STAGES) -> None:
        self.world = World()
        self.p, self.r = p, p.recipe
        self.log = log if self.world.main else (lambda *a, **k: None)  # rank 0 alone speaks
        self.dir = p.run_dir
        self._ddp = None
        self.model = p.model
        self.masks: Masks | None = None  # from the hard prune on; shared by the later stages
        self.stages = [cls(self) for cls in stages]
        self.info: dict = {"times": {}}
        self.metrics_lines = 0
        self._clock = time.perf_counter()  # stage time counted up to here
        self._started = (time.perf_counter(), 0)  # this process's start: time, batches done
        self._tb = None  # TensorBoard writer (logging.tensorboard)
        self.flag = _StopFlag()

    @property
    def steps_per_epoch(self) -> int:
        return _steps_per_epoch(self.p)

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
                "format": CHECKPOINT_FORMAT,
                "version": 1,
                "recipe": recipe_dump(self.r),
                "stage": stage,
                "epoch": epoch,
                "batch": batch,
                "model": self.model.state_dict(),
                "optimizer": opt.state_dict() if opt is not None else None,
                "scheduler": sched.state_dict() if sched is not None else None,
                "masks": self.masks.state_dict() if self.masks is not None else None,
                **{k: v for stage in self.stages for k, v in stage.state_dict().items()},
                "rng": rng,
                "metrics_lines": self.metrics_lines,
                "info": self.info,
                "epoch_sums": sums,  # the interrupted epoch's running loss/accuracy sums
                "data_fingerprint": self.p.extra["data_fingerprint"],
            },
            self.dir / CHECKPOINT,
        )

    # stages ------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        bs, amp = self.r.data.eval_batch_size, self.r.amp
        objective = self.p.data.objective
        if objective == "next_token" and "eval_batch_size" not in self.r.data.model_fields_set:
            # a window's logits are seq_len × vocab floats (512 windows of 128 tokens and a
            # 4k vocabulary: GiBs); the training batch is known to fit
            bs = self.r.data.batch_size
        acc, loss = evaluate(self.model, self.p.data.test, self.p.device, bs, amp, objective)
        out = {"test_acc": acc, "test_loss": loss}
        if objective == "next_token":  # non-overlapping windows of the held-out tokens
            out["test_perplexity"] = math.exp(loss)
        if self.p.data.val is not None:
            out["val_acc"], out["val_loss"] = evaluate(
                self.model, self.p.data.val, self.p.device, bs, amp, objective
            )
        return out

    # the loop ------------------------------------------------------------------------------------
    def run(self) -> dict:
        st = self.p.resume_state
        names = [stage.name for stage in self.stages]
        start = names.index(st["stage"]) if st else 0
        if st:
            self._restore(st)
            done = sum(self._planned_batches()[:start])
            done += st["epoch"] * self.steps_per_epoch + st["batch"]
            self._started = (time.perf_counter(), done)  # the ETA's pace: this process's
        else:
            ev = self.evaluate()
            self.info["start_acc"] = ev["test_acc"]
            note_perplexity(self.info, "start", ev)
        try:
            with self.flag:
                for si in range(start, len(self.stages)):
                    self._run_stage(si, st if (st and si == start) else None)
            return self._finish()
        finally:
            if self._tb is not None:  # also when a stage fails or the run is interrupted
                self._tb.close()
                self._tb = None

    def _restore(self, st: dict) -> None:
        """Model, masks, info, metrics file and RNG as the checkpoint left them."""
        self.model.load_state_dict(st["model"])
        if st.get("masks") is not None:
            self.masks = Masks.from_state_dict(self.model, st["masks"])
        self.info = st["info"]
        self._truncate_metrics(st["metrics_lines"])
        torch.set_rng_state(st["rng"]["torch"])
        if "cuda" in st["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["rng"]["cuda"])
        self.log(f"resuming {self.dir}: {self._where(st['stage'], st['epoch'], st['batch'])}")

    def _run_stage(self, si: int, state: dict | None) -> None:
        stage = self.stages[si]
        if not stage.active(self.r):
            return
        opt, sched = self._begin(stage, state) if stage.trains() else (None, None)
        epoch = state["epoch"] if state else 0
        batch = state["batch"] if state else 0
        carry = state.get("epoch_sums") if state and batch else None
        self._clock = time.perf_counter()
        while epoch < stage.epochs:
            res = self._train_epoch(si, epoch, batch, carry, opt)
            if res.interrupted:
                self.save(stage.name, epoch, res.batches, opt, sched, sums=res.sums)
                self._interrupted(stage.name, epoch, res.batches)
            batch, carry = 0, None
            epoch += 1
            sched = self._end_epoch(si, epoch, res, opt, sched)
            self.save(stage.name, epoch, 0, opt, sched)
            if self.flag.stop:
                self._interrupted(stage.name, epoch, 0)
        self._tick(stage.name)
        stage.end()

    def _begin(self, stage, state: dict | None):
        """The stage's optimizer and schedule, and whatever the stage builds on them; the
        optimizer and schedule state from ``state`` when resuming."""
        opt = make_optimizer(self.model.parameters(), stage.cfg.optimizer)
        sched = make_scheduler(opt, stage.cfg.schedule, stage.schedule_epochs())
        stage.begin(opt, state)
        if state is not None and state.get("optimizer") is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if self.masks is not None:
                self.masks.attach(opt)  # re-zero the loaded optimizer state off the support
        return opt, sched

    def _train_epoch(self, si: int, epoch: int, batch: int, carry: dict | None, opt):
        stage, w = self.stages[si], self.world
        stage.before_epoch(epoch)
        order = batch_order(len(self.p.data.train), self.r.seed, si, epoch)
        return train_epoch(
            self._train_model(),
            self.p.data.train,
            opt,
            order=shard_order(order, self.r.data.batch_size, w.rank, w.size),
            batch_size=self.r.data.batch_size // w.size,
            device=self.p.device,
            start_batch=batch,
            admm=stage.penalty(),
            amp=self.r.amp,
            num_workers=self.r.data.num_workers,
            progress=self.r.progress,
            desc=f"{stage.name} {epoch + 1}/{stage.epochs}",
            should_stop=lambda: self._any(self.flag.stop),
            on_step=stage.on_step(epoch),
            carry=carry,
            status=self._eta(si, epoch),
            objective=self.p.data.objective,
            clip_grad_norm=getattr(stage.cfg, "clip_grad_norm", None),
            grad_accum=getattr(stage.cfg, "grad_accum", 1),
        )

    def _end_epoch(self, si: int, epoch: int, res, opt, sched):
        """The epoch's metrics row and log line; returns the (possibly new) schedule."""
        stage = self.stages[si]
        row = {
            "stage": stage.name,
            "epoch": epoch,
            "train_loss": res.loss,
            "train_acc": res.accuracy,
            "lr": opt.param_groups[0]["lr"],
        }
        sched.step()
        extra, sched = stage.end_epoch(epoch, res, opt, sched)
        row.update(extra)
        row.update(self.evaluate())
        self.metric(**row)
        self.log(
            f"[{stage.name} {epoch}/{stage.epochs}] loss {res.loss:.4f} train acc "
            f"{res.accuracy:.4f} test acc {row['test_acc']:.4f}"
            + (f" penalty {row['penalty']:.3g}" if "penalty" in row else "")
            + f" ({self._eta(si, epoch)(0)})"
        )
        return sched

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

    def _interrupted(self, stage: str, epoch: int, batch: int):
        raise Interrupted(
            f"interrupted {'in ' if batch else ''}{self._where(stage, epoch, batch)}; "
            f"checkpoint saved in {self.dir}. Continue with: {self.p.resume_hint()}"
        )

    def _planned_batches(self) -> list[int]:
        """Batches each stage trains, in order."""
        return [
            stage.epochs * self.steps_per_epoch if stage.active(self.r) else 0
            for stage in self.stages
        ]

    def _where(self, name: str, epoch: int, batch: int) -> str:
        epochs = next(stage.epochs for stage in self.stages if stage.name == name)
        return _position(name, epochs, self.steps_per_epoch, epoch, batch)

    def _eta(self, si: int, epoch: int) -> Callable[[int], str]:
        """``status(b)`` for the progress bar: the whole run's time left at this pace."""
        plan = self._planned_batches()
        before = sum(plan[:si]) + epoch * self.steps_per_epoch
        total = sum(plan)
        t0, done0 = self._started

        def status(b: int) -> str:
            done = before + b
            rate = (time.perf_counter() - t0) / max(done - done0, 1)
            return f"ETA {_duration(rate * (total - done))}"

        return status

    def test_inputs(self, n: int) -> torch.Tensor:
        """The first ``n`` test inputs (fewer if the test set is smaller), on the run's device."""
        test = self.p.data.test
        return test.batch(torch.arange(min(n, len(test))))[0].to(self.p.device)

    def _finish(self) -> dict:
        """The finishing steps (:mod:`admmprune.run.finish`) in order; rank 0 writes the files."""
        if self.p.finish is not None:
            return self.p.finish(self)
        x1 = self.test_inputs(1)
        # a removed channel's consumer weights are stored (and counted) as zeros; the model's
        # function is unchanged, so the accuracy below is measured after
        dead = zero_dead_inputs(self.model, x1) if self.r.compact else 0
        final = self.evaluate()
        self.masks.detach()
        agree = self.world.all_equal([*self.masks.values(), *self.model.parameters()])
        if not agree:
            raise RuntimeError("ranks disagree on the final masks or weights; please report it.")
        names = self.p.extra["constraint_names"]
        summary = summarize(self.model, names, self.r, self.info, final)
        if not self.world.main:
            return summary
        if self.r.compact:  # first: a refusal is reported in the summary, never half-written
            stats = compact_stats(self.model, x1, self.test_inputs(64))
            summary["compact"] = {**stats, "dead_input_weights_zeroed": dead}
            if "refused" in stats:
                self.log(f"[compact] refused (the pruned model is saved as is): {stats['refused']}")
        atomic_save(self.model.state_dict(), self.dir / "model.pt")
        self.masks.save(self.dir / "masks.pt")
        spec, packed = model_spec(self.r, self.p.data), self.dir / "model.admmprune"
        summary["storage"] = storage_stats(self.model, packed, spec, self.p.extra["quant_names"])
        if self.world.active:
            summary["distributed"] = {
                "world_size": self.world.size,
                "backend": self.world.backend,
                "masks_and_weights_identical_on_all_ranks": agree,
            }
        write_run_files(self.dir, summary)
        return summary


def _steps_per_epoch(p: Prepared) -> int:
    return -(-len(p.data.train) // p.recipe.data.batch_size)


def _position(stage: str, epochs: int, steps: int, epoch: int, batch: int) -> str:
    """Where a checkpoint stands, for people: epochs and batches counted from 1."""
    if batch:
        return f"{stage} epoch {epoch + 1}/{epochs}, after batch {batch}/{steps}"
    if epoch == 0:
        return f"the start of {stage}"
    return f"after {stage} epoch {epoch}/{epochs}"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
