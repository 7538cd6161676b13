"""The command line: ``admmprune run RECIPE``, ``check RECIPE``, ``demo``, ``report RUN_DIR``,
``export RUN_DIR``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from importlib import resources

from .._version import __version__
from .config import RecipeError
from .parse import load_recipe, parse_recipe, parse_set

DEMO = "demo_digits.yaml"


def _demo_recipe_text() -> str:
    return resources.files("admmprune").joinpath("recipes", DEMO).read_text()


def _error(exc: Exception) -> int:
    print(f"admmprune: error: {exc}", file=sys.stderr)
    return 2


def _continue_command(args, argv: list[str], run_dir) -> str:
    """The command line that continues this very run: the same arguments, with --resume and
    the run dir made explicit (--force dropped: it would delete the run)."""
    rest = [a for a in argv if a not in ("--resume", "--force")]
    if args.output_dir is None:
        rest += ["--output-dir", str(run_dir)]
    return shlex.join(["admmprune", *rest, "--resume"])


def _execute(recipe, args, argv: list[str]) -> int:
    from .distributed import World
    from .pipeline import prepare, run
    from .report import format_summary
    from .runner import Interrupted

    try:
        prepared = prepare(recipe, resume=args.resume, force=args.force)
    except RecipeError as exc:
        return _error(exc)
    prepared.continue_command = _continue_command(args, argv, prepared.run_dir)
    world = World()
    try:
        summary = run(prepared)
    except Interrupted as exc:
        if world.main:
            print(f"admmprune: {exc}", file=sys.stderr)
        return 130
    finally:
        world.close()
    if world.main and "perplexity_dense" in summary:  # a language-model run
        print(
            f"\nperplexity {summary['perplexity_dense']:.3f} dense → "
            f"{summary['perplexity_pruned']:.3f} pruned, {summary['kept_fraction']:.1%} of the "
            f"pruned layers' weights kept"
        )
    elif world.main:
        print()
        print(format_summary(summary))
        print(f"\nrun dir: {prepared.run_dir}")
    return 0


def _check(recipe, args) -> int:
    """Everything ``run`` validates, and the plan; writes nothing."""
    from .pipeline import plan, prepare

    try:
        prepared = prepare(recipe, resume=args.resume, force=args.force)
    except RecipeError as exc:
        return _error(exc)
    print(plan(prepared))
    return 0


def _overrides(args) -> dict:
    out = parse_set(getattr(args, "set", None) or [])
    if getattr(args, "data_dir", None):
        out["data.dir"] = args.data_dir
    if getattr(args, "output_dir", None):
        out["output_dir"] = args.output_dir
    if getattr(args, "device", None):
        out["device"] = args.device
    if getattr(args, "no_progress", False):
        out["progress"] = False
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="admmprune", description="DNN pruning as constrained optimization, solved by ADMM."
    )
    parser.add_argument("--version", action="version", version=f"admmprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--output-dir", help="run dir (overrides the recipe's output_dir)")
        p.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the recipe)")
        p.add_argument("--resume", action="store_true", help="continue the run in the run dir")
        p.add_argument("--force", action="store_true", help="delete a non-empty run dir first")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument(
            "--set",
            action="append",
            metavar="KEY.PATH=VALUE",
            help="override a recipe key (value in YAML), e.g. --set admm.rho=0.01; repeatable",
        )

    p_run = sub.add_parser("run", help="run a YAML recipe")
    p_run.add_argument("recipe", help="path to the recipe YAML")
    p_run.add_argument("--data-dir", help="dataset folder (overrides data.dir)")
    p_run.add_argument(
        "--nproc", type=int, default=1, help="train data-parallel on N processes (torchrun, DDP)"
    )
    common(p_run)

    p_check = sub.add_parser(
        "check", help="validate a recipe (data, model, layers, run dir) and print its plan"
    )
    p_check.add_argument("recipe", help="path to the recipe YAML")
    p_check.add_argument("--data-dir", help="dataset folder (overrides data.dir)")
    common(p_check)

    p_demo = sub.add_parser("demo", help="prune a small network on the embedded digits data")
    common(p_demo)
    p_demo.add_argument(
        "--print-recipe", action="store_true", help="print the demo recipe and exit"
    )

    p_rep = sub.add_parser("report", help="print the summary of a finished run")
    p_rep.add_argument("run_dir")

    p_exp = sub.add_parser("export", help="write a finished run's model packed (and as ONNX)")
    p_exp.add_argument("run_dir")
    p_exp.add_argument("--out", help="packed file to write (default RUN_DIR/model.admmprune)")
    p_exp.add_argument("--onnx", metavar="FILE", help="also write the compacted model as ONNX")
    p_exp.add_argument(
        "--sparse", metavar="DIR", help="LM runs: also write a sparse HF checkpoint (load_sparse)"
    )

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if getattr(args, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:
        import subprocess

        from .distributed import batch_split_error, launch_args

        try:  # a bad recipe is refused here, before torchrun starts N processes to refuse it
            recipe = load_recipe(args.recipe, _overrides(args))
        except RecipeError as exc:
            return _error(exc)
        if why := batch_split_error(recipe.data.batch_size, args.nproc):
            return _error(RecipeError(why))
        rest = [a for i, a in enumerate(argv) if a != "--nproc" and argv[i - 1 : i] != ["--nproc"]]
        rest = [a for a in rest if not a.startswith("--nproc=")]
        return subprocess.call(launch_args(args.nproc, rest))
    if args.command == "export":
        from .export import export_run

        try:
            for line in export_run(args.run_dir, args.out, args.onnx, args.sparse):
                print(line)
        except ValueError as exc:
            return _error(exc)
        return 0
    if args.command == "report":
        from .report import print_report

        try:
            print(print_report(args.run_dir))
        except ValueError as exc:
            return _error(exc)
        return 0
    try:
        if args.command == "demo":
            import yaml

            if args.print_recipe:
                print(_demo_recipe_text())
                return 0
            recipe = parse_recipe(yaml.safe_load(_demo_recipe_text()), _overrides(args))
        else:
            recipe = load_recipe(args.recipe, _overrides(args))
    except RecipeError as exc:
        return _error(exc)
    if args.command == "check":
        return _check(recipe, args)
    return _execute(recipe, args, argv)


if __name__ == "__main__":
    sys.exit(main())
