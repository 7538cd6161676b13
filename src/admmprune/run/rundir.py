"""The run directory, the same for every kind of run (image recipes and language models): it is
refused when it holds something and neither ``--resume`` nor ``--force`` says what to do with it;
a run's checkpoint file, the recipe as saved beside it, and what resuming checks (the same
recipe key by key, the same data wherever it lies)."""

from __future__ import annotations

from pathlib import Path

from .._io import safe_load
from .config import DATA_LOCATION, Recipe, RecipeError
from .parse import differing_keys, flatten

__all__: list[str] = []  # internal: used by the pipeline and LM runs

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "admmprune.checkpoint"


def recipe_dump(recipe: Recipe) -> dict:
    """The recipe as saved in ``recipe.yaml`` and in checkpoints (what resume compares)."""
    return recipe.model_dump(mode="json")


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
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


def _with_defaults(saved: dict) -> dict:
    """A saved recipe dump read by today's schema: a key added since the run started takes
    its default, which is what that run did (so it is no difference)."""
    try:
        return recipe_dump(Recipe.model_validate(saved))
    except Exception:  # a recipe today's schema refuses: compare it as saved
        return saved


def load_resume_state(run_dir: Path, recipe: Recipe) -> dict:
    """The run's checkpoint, verified, for a recipe that computes the same run."""
    ckpt = run_dir / CHECKPOINT
    if not ckpt.is_file():
        raise RecipeError(f"--resume: no checkpoint at {str(ckpt)!r}; start without --resume.")
    try:
        state = safe_load(ckpt, "run checkpoint")
    except ValueError as exc:
        raise RecipeError(f"--resume: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RecipeError(f"{str(ckpt)!r} is not an admmprune run checkpoint.")
    diff = differing_keys(_with_defaults(state["recipe"]), recipe_dump(recipe))
    if diff:
        raise RecipeError(
            f"the recipe differs from the one {str(run_dir)!r} was started with, in: "
            f"{'; '.join(diff)}. Resume with the recipe saved in "
            f"{str(run_dir / 'recipe.yaml')!r}, or use --force to delete the run and start over."
        )
    return state


def same_data(run_dir: Path, state: dict, recipe: Recipe, fingerprint: str) -> None:
    """A run resumes from another data folder only if it holds the very same data."""
    a, b = flatten(state["recipe"]), flatten(recipe_dump(recipe))
    moved = [f"{k} ({a.get(k)!r} → {b.get(k)!r})" for k in DATA_LOCATION if a.get(k) != b.get(k)]
    if moved and state.get("data_fingerprint") != fingerprint:
        raise RecipeError(
            f"{'; '.join(moved)}: the data there is not the data {str(run_dir)!r} was started "
            "with (different images or labels); point it at the original data, or use --force."
        )
