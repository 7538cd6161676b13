"""ADMM-NN on MNIST, side by side with the pruning heuristics at the same epoch budget.

One dense model is trained once; every method then starts from it and gets the same budget:
``--compress-epochs`` of its compression stage (ADMM, or the heuristic's pruning schedule with
masked fine-tuning) plus ``--retrain-epochs`` of masked retraining. The dense model trained for
the same total number of epochs is reported as the reference.

Compression rate = weights of all constrained layers / non-zero weights in them. Per-layer keep
rates follow ADMM-NN's LeNet-5 pattern (conv1 20 %, conv2 8 %, fc1 0.9 %, fc2 7 % is 71.2x),
scaled by one factor to hit each rate.

    python benchmarks/mnist_admmnn.py --data-dir ../shared/data          # full, about an hour
    python benchmarks/mnist_admmnn.py --data-dir ../shared/data --quick  # under 10 minutes

Writes ``results.md``, ``results.json`` and ``accuracy_vs_compression.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from admmprune._io import safe_load
from admmprune.models import build_model
from admmprune.run.data import load_data
from admmprune.run.parse import parse_recipe
from admmprune.run.pipeline import prepare, run
from admmprune.run.train import (
    batch_order,
    evaluate,
    make_optimizer,
    make_scheduler,
    resolve_device,
    train_epoch,
)

# Kept fraction per layer at 71.2x (ADMM-NN, ECCV 2018); LeNet-300-100 after Han et al. 2015.
PATTERNS = {
    "lenet5": {"conv1": 0.20, "conv2": 0.08, "fc1": 0.009, "fc2": 0.07},
    "lenet300": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26},
}
METHODS = ("admm", "magnitude", "iterative", "gradual")
OPTIMIZERS = {  # the ADMM stage's W-step (--admm-optimizer) and retraining (--retrain-optimizer)
    "adam": {"name": "adam", "lr": 1e-3},
    "sgd": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
}


def allocate(model: torch.nn.Module, pattern: dict[str, float], rate: float) -> dict[str, float]:
    """Scale ``pattern`` by one factor s (each keep capped at 1) so the whole rate is ``rate``."""
    sizes = {name: getattr(model, name).weight.numel() for name in pattern}
    target = sum(sizes.values()) / rate
    lo, hi = 0.0, 1.0 / min(pattern.values())
    for _ in range(100):
        s = (lo + hi) / 2
        kept = sum(min(1.0, s * pattern[n]) * sizes[n] for n in pattern)
        lo, hi = (s, hi) if kept < target else (lo, s)
    return {n: round(min(1.0, s * pattern[n]), 6) for n in pattern}


def parse_pattern(
    parser: argparse.ArgumentParser,
    items: list[str] | None,
    default: dict[str, float],
    flag: str = "--pattern",
    kind: type = float,
    low: float = 0.0,
    high: float = 1.0,
) -> dict[str, float]:
    """``["conv1=0.5", ...]`` → ``{"conv1": 0.5, ...}``; every layer of ``default``, no other;
    each value of type ``kind`` in (``low``, ``high``]."""
    if items is None:
        return dict(default)
    pattern = {}
    example = f"{next(iter(default))}={next(iter(default.values()))}"
    for item in items:
        name, _, value = item.partition("=")
        try:
            pattern[name] = kind(value)
        except ValueError:
            parser.error(f"{flag} {item!r}: write LAYER=VALUE, e.g. {example}")
        if not low < pattern[name] <= high:
            parser.error(f"{flag} {item!r}: the value must be in ({low:g}, {high:g}]")
    if set(pattern) != set(default):
        layers, got = sorted(default), sorted(pattern)
        parser.error(f"{flag} must give exactly the layers {layers}, got {got}")
    return pattern


def pct(acc) -> str:
    """An accuracy as a percentage for tables; "–" when there is none."""
    return "–" if acc is None else f"{100 * acc:.2f} %"


def run_recipe(recipe: dict, data) -> dict:
    """Run one recipe (its run dir replaced) on already loaded ``data``: every run of a
    benchmark sees the very same tensors."""
    shutil.rmtree(recipe["output_dir"], ignore_errors=True)
    return run(prepare(parse_recipe(recipe), data=data), log=lambda *_: None)


def train_dense(
    args, data, device, epochs: int, start_state=None, stage: int = 0, lr=0.01, weight_decay=0.0
):
    """SGD (momentum 0.9, cosine schedule) from scratch, or on from ``start_state``."""
    torch.manual_seed(args.seed)
    model = build_model(
        args.model,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        input_size=data.input_size,
    ).to(device)
    if start_state is not None:
        model.load_state_dict(start_state)
    base = _base(args, {})
    base["pretrain"]["optimizer"].update(lr=lr, weight_decay=weight_decay)
    opt_cfg = parse_recipe(base).pretrain
    opt = make_optimizer(model.parameters(), opt_cfg.optimizer)
    sched = make_scheduler(opt, opt_cfg.schedule, epochs)
    for e in range(epochs):
        train_epoch(
            model,
            data.train,
            opt,
            order=batch_order(len(data.train), args.seed, stage, e),
            batch_size=args.batch_size,
            device=device,
        )
        sched.step()
    return model


def _base(args, constraints: dict) -> dict:
    return {
        "seed": args.seed,
        "device": args.device,
        "progress": False,
        "model": {"name": args.model},
        "data": {"name": args.dataset, "dir": args.data_dir, "batch_size": args.batch_size},
        "pretrain": {
            "epochs": 0,
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "schedule": {"name": "cosine"},
        },
        "constraints": constraints or {"fc1": {"unstructured": 0.5}},
    }


def recipe_for(args, method: str, keeps: dict, dense_path: Path, out: Path) -> dict:
    r = _base(args, {n: {"unstructured": k} for n, k in keeps.items()})
    r.update(
        output_dir=str(out),
        method=method,
        model={"name": args.model, "checkpoint": str(dense_path)},
        admm={
            "epochs": args.compress_epochs,
            "optimizer": OPTIMIZERS[args.admm_optimizer],
            "updates_per_epoch": args.updates_per_epoch,
            "rho": args.rho,
            "rho_growth": args.rho_growth,
            "rounds": args.rounds,
        },
        heuristic={"cycles": 3, "prune_every": args.gradual_every, "end": 0.75},
        retrain={
            "epochs": args.retrain_epochs,
            "optimizer": OPTIMIZERS[args.retrain_optimizer],
            "schedule": {"name": "cosine"},
        },
    )
    return r


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        pts = sorted(
            (r["rate"], 100 * r["accuracy"]) for r in results["runs"] if r["method"] == method
        )
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    d = results["dense"]
    ref = d["same_budget_acc"] if d["same_budget_acc"] is not None else d["acc"]
    ax.axhline(100 * ref, color="gray", ls="--", label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("compression rate (constrained layers, x)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{results['settings']['model']} on {results['settings']['dataset']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict) -> str:
    rates = sorted({r["target_rate"] for r in results["runs"]})
    d = results["dense"]
    lines = [
        f"Dense: {100 * d['acc']:.2f} % after {d['epochs']} epochs"
        + (
            "."
            if d["same_budget_acc"] is None
            else f"; {100 * d['same_budget_acc']:.2f} % after {d['same_budget_epochs']} "
            "(the same total budget)."
        ),
        "",
        "| method | " + " | ".join(f"{r:g}x" for r in rates) + " |",
        "|---|" + "---:|" * len(rates),
    ]
    for method in METHODS:
        cells = []
        for rate in rates:
            run_ = next(
                (r for r in results["runs"] if r["method"] == method and r["target_rate"] == rate),
                None,
            )
            cells.append("–" if run_ is None else f"{100 * run_['accuracy']:.2f} %")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Kept weights per layer (all methods reach the same counts):",
        "",
        "| rate | " + " | ".join(results["runs"][0]["kept"]) + " | total kept | measured rate |",
        "|---|" + "---:|" * (len(results["runs"][0]["kept"]) + 2),
    ]
    for rate in rates:
        r = next(r for r in results["runs"] if r["target_rate"] == rate)
        lines.append(
            f"| {rate:g}x | "
            + " | ".join(f"{v:,}" for v in r["kept"].values())
            + f" | {sum(r['kept'].values()):,} | {r['rate']:.1f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with MNIST in torchvision's layout")
    p.add_argument("--dataset", default="mnist", choices=("mnist", "digits"))
    p.add_argument("--model", default="lenet5", choices=tuple(PATTERNS))
    p.add_argument("--quick", action="store_true", help="2 rates, short schedule, 20k images")
    p.add_argument(
        "--pattern",
        nargs="+",
        default=None,
        metavar="LAYER=KEEP",
        help="per-layer keep pattern scaled to each rate (default: the paper's, see PATTERNS)",
    )
    p.add_argument("--rates", type=float, nargs="+", default=[20, 50, 71.2, 100, 200])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--dense", default=None, help="dense state_dict to start from (no training)")
    p.add_argument("--dense-epochs", type=int, default=10, help="(with --dense: its epochs)")
    p.add_argument("--compress-epochs", type=int, default=5)
    p.add_argument("--retrain-epochs", type=int, default=2)
    p.add_argument("--updates-per-epoch", type=int, default=4)
    p.add_argument("--rho", type=float, default=0.01)
    p.add_argument(
        "--rho-growth",
        type=float,
        default=None,
        help="rho factor per update (default: reach --rho-final at each round's last update)",
    )
    p.add_argument("--rho-final", type=float, default=1.0)
    p.add_argument("--admm-optimizer", default="adam", choices=sorted(OPTIMIZERS))
    p.add_argument("--retrain-optimizer", default="adam", choices=sorted(OPTIMIZERS))
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--gradual-every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-subset", type=int, default=0, help="train on the first N images")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip training the dense model on for the same budget (the reference row)",
    )
    p.add_argument("--out", default="benchmarks/results/mnist_admmnn")
    args = p.parse_args()
    args.pattern = parse_pattern(p, args.pattern, PATTERNS[args.model])
    if args.quick:
        args.rates = [71.2, 200]
        args.dense_epochs, args.compress_epochs, args.retrain_epochs = 3, 2, 1
        args.train_subset = args.train_subset or 20000
    if args.rho_growth is None:  # every progressive round restarts rho at --rho
        updates = max(2, args.compress_epochs * args.updates_per_epoch // args.rounds)
        args.rho_growth = (args.rho_final / args.rho) ** (1 / (updates - 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    data = load_data(args.dataset, data_dir=args.data_dir, seed=args.seed)
    if args.train_subset:
        data.train = data.train.subset(torch.arange(min(args.train_subset, len(data.train))))
    device = resolve_device(args.device)  # the dense models train where the recipes do

    t0 = time.perf_counter()
    if args.dense:  # e.g. an earlier run's dense.pt: every longer run starts from the same model
        dense = train_dense(args, data, device, 0, start_state=safe_load(args.dense, "--dense"))
        dense_path = Path(args.dense)
    else:
        dense = train_dense(args, data, device, args.dense_epochs)
        dense_path = out / "dense.pt"
        torch.save(dense.state_dict(), dense_path)
    dense_acc = evaluate(dense, data.test, device)[0]
    budget = args.compress_epochs + args.retrain_epochs
    same_acc = None
    if not args.no_reference:
        longer = train_dense(args, data, device, budget, start_state=dense.state_dict(), stage=1)
        same_acc = evaluate(longer, data.test, device)[0]
    print(
        f"dense: {100 * dense_acc:.2f} % ({args.dense_epochs} epochs), "
        f"{pct(same_acc)} (+{budget} epochs), {time.perf_counter() - t0:.0f} s"
    )

    results = {
        "settings": {k: v for k, v in vars(args).items()},
        "dense": {
            "acc": dense_acc,
            "epochs": args.dense_epochs,
            "same_budget_acc": same_acc,
            "same_budget_epochs": args.dense_epochs + budget,
        },
        "runs": [],
    }
    for rate in args.rates:
        keeps = allocate(dense, args.pattern, rate)
        for method in args.methods:
            t0 = time.perf_counter()
            run_dir = out / "runs" / f"{method}_{rate:g}x"
            summary = run_recipe(recipe_for(args, method, keeps, dense_path, run_dir), data)
            kept = {
                layer["name"].removesuffix(".weight"): layer["kept"] for layer in summary["layers"]
            }
            row = {
                "method": method,
                "target_rate": rate,
                "rate": summary["constrained_layers"]["rate"],
                "accuracy": summary["accuracy"]["final"],
                "pruned_before_retrain": summary["accuracy"]["pruned_before_retrain"],
                "kept": kept,
                "keep_fractions": keeps,
                "seconds": time.perf_counter() - t0,
            }
            results["runs"].append(row)
            print(
                f"{method:>9} {rate:>6g}x: {100 * row['accuracy']:.2f} % "
                f"(before retrain {100 * row['pruned_before_retrain']:.2f} %), "
                f"measured {row['rate']:.1f}x, {row['seconds']:.0f} s",
                flush=True,
            )
    results["seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "results.md").write_text(table + "\n")
    plot(results, out / "accuracy_vs_compression.png")
    print("\n" + table)
    print(
        f"\nwrote {out}/results.md, results.json, accuracy_vs_compression.png "
        f"in {results['seconds'] / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
