"""A recipe's run: the stages of :mod:`admmprune.run.stages` (pretrain → compress → hard prune →
masked retrain → quantize → hard quantize) driven by one runner, then the finishing steps of
:mod:`admmprune.run.finish` (compact, storage, packed file, report); resumable.

Everything that can be wrong with a recipe (model, data, checkpoint, constraint spec) is checked
in :func:`prepare`, before the run dir is created, so a bad recipe leaves nothing behind.

A checkpoint is written atomically at every epoch boundary (and, on Ctrl-C, after the batch in
flight): model, optimizer, scheduler, masks, RNG state, every stage's ``state_dict()``
entries (ADMM Z/U/rho, the quantizer), and the position (stage, epoch, batch). ``resume``
continues from it exactly: batch order is a function of (seed, stage, epoch), so the resumed
run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from torch import nn

from .._io import safe_load
from ..models import build_model
from ..solvers.admm import GROUP_COMBINABLE
from ..solvers.oneshot.driver import check as check_oneshot
from ..structure.groups import channel_groups
from ..structure.heads import head_groups
from ..weights.select import select
from .config import Recipe, RecipeError
from .data import DataBundle, load_data
from .distributed import World, batch_split_error
from .rundir import check_run_dir, load_resume_state, recipe_dump, same_data
from .runner import Interrupted, Prepared, _position, _Run, _steps_per_epoch
from .stages import STAGES
from .train import (
    resolve_device,
)

__all__ = ["Interrupted", "Prepared", "plan", "prepare", "run"]


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
    side by side on the very same tensors; the recipe's batch sizes still apply). A
    ``model.hf`` recipe is a language-model run: one shot (:mod:`admmprune.run.lm`) or through
    this runner with training stages (:mod:`admmprune.run.lm_train`).
    """
    if recipe.model.hf is not None:
        from . import lm, lm_train

        prepare_lm = lm_train.prepare if lm.trains(recipe) else lm.prepare
        return prepare_lm(recipe, resume=resume, force=force)
    run_dir = Path(recipe.output_dir)
    check_run_dir(run_dir, resume, force)
    _check_environment(recipe)
    resume_state = load_resume_state(run_dir, recipe) if resume else None
    try:
        device = resolve_device(recipe.device)
        data = data or _load(recipe)
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
            same_data(run_dir, resume_state, recipe, fingerprint)
        spec, default = recipe.spec()
        x1 = data.test.batch(torch.arange(1))[0]
        constraint_names, groups = _constrained(model, recipe, spec, default, x1)
        if recipe.method == "oneshot" or recipe.admm.init == "oneshot":
            check_oneshot(model, spec, default, recipe.oneshot.dense_target)
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


def _check_environment(recipe: Recipe) -> None:
    """Process count and optional extras the recipe needs."""
    world = World()
    if world.active and (why := batch_split_error(recipe.data.batch_size, world.size)):
        raise RecipeError(why)
    if recipe.logging.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise RecipeError(
                "logging.tensorboard needs the tensorboard extra: "
                "pip install 'admmprune[tensorboard]' (or set logging.tensorboard: false)."
            ) from None


def _load(recipe: Recipe) -> DataBundle:
    d = recipe.data
    return load_data(
        d.name,
        data_dir=d.dir,
        path=d.path,
        download=d.download,
        augment=d.augment,
        val_size=d.val_size,
        image_size=d.image_size,
        seed=recipe.seed,
    )


def _constrained(model, recipe: Recipe, spec, default, x1) -> tuple[dict, list]:
    """Each constrained parameter's constraint (as text) and the coupled channel groups;
    unmatched, conflicting or wrong-rank keys fail here."""
    constraint_names, combinable = {}, set()
    if spec or default is not None:
        for t in select(model, spec, default):
            constraint_names[t.name] = repr(t.constraint)
            if isinstance(t.constraint, GROUP_COMBINABLE):
                combinable.add(t.name)  # may also sit in a channel group (filter + column)
    groups = []
    for c in recipe.coupled():
        if c.kind == "heads":
            new = head_groups(model, c.keep, layers=c.layers, norm=c.norm)
        else:
            new = channel_groups(model, x1, c.keep, layers=c.layers, norm=c.norm)
        if not new:
            raise RecipeError(
                f"coupled_channels layers {c.layers!r} matches no channel group; use a glob "
                "on layer names, e.g. 'layer3*' (the output layer is never pruned)."
            )
        groups += new
        fused: set[str] = set()  # a fused experts weight: one group per expert, this entry
        for g in new:
            for pname, _ in g.members:
                if g.expert is not None and pname in fused:
                    continue
                if g.expert is not None:
                    fused.add(pname)
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
    return constraint_names, groups


def plan(p: Prepared) -> str:
    """What :func:`run` would do with ``p``, for people (``admmprune check``)."""
    if not isinstance(p, Prepared):
        from . import lm

        return lm.plan(p)
    r, d = p.recipe, p.data
    val = f", {len(d.val):,} validation" if d.val is not None else ""
    what = (
        f"{len(d.train):,} training, {len(d.test):,} test windows of {d.input_size} tokens"
        if d.objective == "next_token"
        else f"{len(d.train):,} training, {len(d.test):,} test images{val}; {d.num_classes} classes"
    )
    lines = [
        f"recipe OK: model {r.model.name or r.model.hf} on {r.data.name} ({what}), "
        f"device {p.device}, seed {r.seed}",
        "run dir: "
        + (
            f"{p.run_dir} (resumes: {_resume_position(p)})"
            if p.resume_state
            else f"{p.run_dir} ({'replaced: --force' if p.run_dir.exists() else 'new'})"
        ),
        "stages:",
    ]
    for stage in STAGES:
        if not stage.active(r):
            continue
        cfg = getattr(r, stage.name)
        lines.append(
            f"  {stage.name:<9} {cfg.epochs:>3} epochs  {stage.describe(r)}, "
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


def _resume_position(p: Prepared) -> str:
    st = p.resume_state
    epochs = getattr(p.recipe, st["stage"]).epochs
    return _position(st["stage"], epochs, _steps_per_epoch(p), st["epoch"], st["batch"])


def run(prepared: Prepared, log=print, stages=STAGES) -> dict:
    """Run (or resume) a prepared recipe; returns the summary written to ``summary.json``.

    Under torchrun every rank calls this after :func:`prepare`; rank 0 alone writes.
    """
    if not isinstance(prepared, Prepared):
        from . import lm

        return lm.run(prepared, log)
    p = prepared
    world = World()
    world.init(p.device)
    world.barrier()  # every rank has checked the run dir before rank 0 touches it
    if p.resume_state is None and world.main:
        if p.run_dir.exists():
            shutil.rmtree(p.run_dir)  # only reached with --force (prepare refused otherwise)
        p.run_dir.mkdir(parents=True)
        (p.run_dir / "recipe.yaml").write_text(
            yaml.safe_dump(recipe_dump(p.recipe), sort_keys=False)
        )
    world.barrier()
    return _Run(p, log, stages).run()
