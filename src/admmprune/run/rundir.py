"""The run directory, the same for every kind of run (image recipes and language models): it is
refused when it holds something and neither ``--resume`` nor ``--force`` says what to do with it;
a run's checkpoint file and the recipe as saved beside it."""

from __future__ import annotations

from pathlib import Path

from .config import Recipe, RecipeError

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
