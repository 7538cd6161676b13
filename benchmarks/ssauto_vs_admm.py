"""SS-Auto vs hard ADMM on CIFAR ResNet-20 at one global MAC target and one epoch budget.

1. One dense ResNet-20 (``--dense`` to reuse one), trained on the first 45,000 CIFAR-10 training
   images; accuracy on the last 5,000 (held out, never trained on) and on the 1,000 official test
   images in the shared .npz.
2. Three ways to keep ``--target`` of the MACs of the block convs (``layer*.conv*``) with row +
   column sparsity, each ``--prune-epochs`` of compression + ``--retrain-epochs`` of masked
   retraining from the same dense model:
   - ``ssauto``: soft row/column penalties, one global λ; the per-layer rates emerge;
   - ``admm uniform``: hard ADMM, every layer keeps sqrt(target) of its rows and of its columns;
   - ``admm ssauto-rates``: hard ADMM with the rows/columns fractions SS-Auto chose per layer.
3. Accuracy, kept MACs (positions × kept weights over the block convs) and per-layer rates;
   a PNG bar chart of the per-layer kept fractions.
4. Each pruned model compacted (``admmprune.compact``): its block-conv MACs, the channels
   removed and any zero channel it could not remove; the compact models (their zero columns
   in the form ``to_columns`` measures fastest) and the dense one timed side by side (paired,
   BN folded, NHWC, batch ``--latency-batch``); and each run's
   compression-stage seconds against hard ADMM's (the same epochs, one process).

    python benchmarks/ssauto_vs_admm.py --data-dir ../shared/data          # CPU: short schedule
    python benchmarks/ssauto_vs_admm.py --data-dir ../shared/data --quick  # minutes

Writes ``results.md``, ``results.json`` and ``rates.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar import add_common_args, dense_checkpoint, load
from admmprune import compact
from admmprune.deployment.latency import inference_form, measure_paired
from admmprune.deployment.sparse import to_columns
from admmprune.models import build_model
from admmprune.sets.rows_columns import SoftRowsColumns
from admmprune.weights.count import count
from admmprune.weights.select import select
from mnist_admmnn import pct, run_recipe

LAYERS = "layer*.conv*"
STAGE = "admm"  # the compression stage's name in the summary's seconds
METHODS = ("ssauto", "admm-uniform", "admm-ssauto-rates")


def recipe(args, out: Path, dense: Path, method: str, **extra) -> dict:
    r = {
        "seed": args.seed,
        "device": args.device,
        "progress": False,
        "output_dir": str(out),
        "model": {"name": args.model, "checkpoint": str(dense)},
        "data": {"name": args.dataset, "dir": args.data_dir, "batch_size": args.batch_size},
        "pretrain": {"epochs": 0},
        "method": method,
        "admm": {
            "epochs": args.prune_epochs,
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "schedule": {"name": "cosine"},
            "lr_reset": False,
            "updates_per_epoch": args.updates_per_epoch,
            "rho": args.rho,
            "rho_growth": args.rho_growth,
        },
        "retrain": {
            "epochs": args.retrain_epochs,
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "schedule": {"name": "cosine"},
        },
        "compact": False,
    }
    r.update(extra)
    return r


def kept_macs(
    model: torch.nn.Module, x: torch.Tensor, names: list[str], dense: torch.nn.Module | None = None
) -> float:
    """Kept fraction of the MACs of ``names``: positions × non-zero weights over positions ×
    weights (what a row/column-compacted GEMM computes); with ``dense``, over that model's
    MACs (``model`` being its compacted form)."""
    layers = {c.name: c for c in count(model, x)["layers"]}
    full = layers if dense is None else {c.name: c for c in count(dense, x)["layers"]}
    mods = [n.removesuffix(".weight") for n in names]
    return sum(layers[m].sparse_macs for m in mods) / sum(full[m].macs for m in mods)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, "benchmarks/results/ssauto_vs_admm")
    p.add_argument("--target", type=float, default=0.5, help="fraction of block-conv MACs kept")
    p.add_argument("--prune-epochs", type=int, default=3)
    p.add_argument("--retrain-epochs", type=int, default=2)
    p.add_argument("--updates-per-epoch", type=int, default=2)
    p.add_argument("--rho", type=float, default=0.01)
    p.add_argument("--rho-growth", type=float, default=1.5, help="per update, every method")
    p.add_argument("--plain-prox", action="store_true", help="SS-Auto with debias=False")
    p.add_argument("--no-couple-bn", action="store_true", help="SS-Auto with couple_bn=False")
    p.add_argument("--no-couple", action="store_true", help="SS-Auto with couple=False")
    p.add_argument("--min-keep", type=float, default=0.3, help="SS-Auto's per-layer floor")
    p.add_argument("--dual", action="store_true", help="SS-Auto with a dual variable U")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--latency-batch", type=int, default=64)
    p.add_argument("--latency-rounds", type=int, default=20)
    args = p.parse_args()
    if "admm-ssauto-rates" in args.methods and "ssauto" not in args.methods:
        p.error("admm-ssauto-rates uses the rates the ssauto run chose: add ssauto to --methods")
    if args.quick:
        args.dense_epochs, args.prune_epochs, args.retrain_epochs = 2, 1, 1
        args.train_subset = args.train_subset or 5000
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load(args)
    model_kw = {"num_classes": data.num_classes, "in_channels": data.in_channels,
                "input_size": data.input_size}  # fmt: skip
    dense_path = dense_checkpoint(args, data, out)
    model = build_model(args.model, **model_kw)
    names = [t.name for t in select(model, {LAYERS: SoftRowsColumns()})]
    x1 = data.test.batch(torch.arange(1))[0]

    runs = {}
    compacted = {}

    def go(label: str, method: str, **extra) -> dict:
        t0 = time.perf_counter()
        run_dir = out / "runs" / label.replace(" ", "_")
        s = run_recipe(recipe(args, run_dir, dense_path, method, **extra), data)
        m = build_model(args.model, **model_kw)
        m.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
        rows_cols = {}
        for n in names:
            W = dict(m.named_parameters())[n].detach()
            M = W.reshape(W.shape[0], -1)
            rows_cols[n] = (
                float(M.ne(0).any(1).float().mean()),
                float(M.ne(0).any(0).float().mean()),
            )
        m.eval()
        small, rep = compact(m, x1)
        compacted[label] = small
        runs[label] = {
            "compact_macs": kept_macs(small, x1, names, dense=m),
            "channels_removed": sum(rep.removed.values()),
            "zero_channels_kept": rep.total_not_removable,
            "stage_seconds": s["seconds"],
            "accuracy_test": s["accuracy"]["final"],
            "accuracy_val": s["accuracy"].get("final_val"),
            "dense_test": s["accuracy"]["start"],
            "kept_macs": kept_macs(m, x1, names),
            "rates": {x["name"]: x["kept"] / x["total"] for x in s["layers"]},
            "rows_cols": rows_cols,
            "epochs": args.prune_epochs + args.retrain_epochs,
            "seconds": time.perf_counter() - t0,
        }
        r = runs[label]
        print(f"{label}: val {pct(r['accuracy_val'])}, test "
              f"{100 * r['accuracy_test']:.2f} %, kept MACs {100 * r['kept_macs']:.1f} %, "
              f"{r['seconds']:.0f} s", flush=True)  # fmt: skip
        return r

    # the same rho schedule as the ADMM runs: a rho that stays small never pulls W onto the
    # sparse Z, and the hard prune at the end then costs what retraining cannot win back
    soft = {"layers": [LAYERS], "target": args.target, "by": "macs", "rho": args.rho,
            "rho_growth": args.rho_growth, "updates_per_epoch": args.updates_per_epoch,
            "debias": not args.plain_prox, "couple_bn": not args.no_couple_bn,
            "couple": not args.no_couple,
            "min_keep": args.min_keep, "dual": args.dual}  # fmt: skip
    if "ssauto" in args.methods:
        go("ssauto", "ssauto", ssauto=soft)
    if "admm-uniform" in args.methods:
        u = math.sqrt(args.target)
        go("admm uniform", "admm", constraints={LAYERS: {"filters": u, "columns": u}})
    if "admm-ssauto-rates" in args.methods:
        chosen = runs["ssauto"]["rows_cols"]
        go("admm ssauto-rates", "admm", constraints={
            n.removesuffix(".weight"): {"filters": max(r, 1e-3), "columns": max(c, 1e-3)}
            for n, (r, c) in chosen.items()
        })  # fmt: skip

    dense_model = build_model(args.model, **model_kw)
    dense_model.load_state_dict(torch.load(dense_path, weights_only=True))
    xb = data.test.batch(torch.arange(args.latency_batch))[0]
    # as deployed: BN folded, NHWC, then each layer's zero columns in the form to_columns
    # measures fastest on this batch (compact() removes whole channels only)
    dense_f, xf = inference_form(dense_model.eval(), xb, fold_bn=True, channels_last=True)
    forms = {"dense": dense_f}
    for label, small in compacted.items():
        forms[label] = to_columns(
            inference_form(small, xb, fold_bn=True, channels_last=True)[0], xf
        )
    ms = measure_paired(forms, xf, args.latency_rounds)
    for label, r in runs.items():
        r["latency_ms"], r["speedup"] = ms[label], ms["dense"] / ms[label]
    ref = runs.get("admm uniform")
    for r in runs.values():
        r["stage_ratio"] = (
            r["stage_seconds"].get(STAGE, 0.0) / ref["stage_seconds"][STAGE] if ref else None
        )
    res = {"settings": vars(args), "layers": names, "runs": runs, "dense_latency_ms": ms["dense"],
           "seconds": time.perf_counter() - t_start}  # fmt: skip
    (out / "results.json").write_text(json.dumps(res, indent=2))
    lines = [
        f"ResNet-20, target: keep {100 * args.target:g} % of the block-conv MACs; "
        f"{args.prune_epochs} + {args.retrain_epochs} epochs from the dense model "
        f"({args.dense or f'{args.dense_epochs} epochs'}: "
        f"{100 * next(iter(runs.values()))['dense_test']:.2f} % on the 1k test images).",
        "",
        "| method | val acc. | test acc. (1k) | kept MACs | compact MACs | channels removed "
        "/ zero kept | speedup | compression stage s (× ADMM's) | per-layer kept (min–max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, r in runs.items():
        rates = list(r["rates"].values())
        ratio = f" ({r['stage_ratio']:.2f}×)" if r["stage_ratio"] is not None else ""
        lines.append(
            f"| {label} | {pct(r['accuracy_val'])} | "
            f"{100 * r['accuracy_test']:.2f} % "
            f"| {100 * r['kept_macs']:.1f} % | {100 * r['compact_macs']:.1f} % "
            f"| {r['channels_removed']} / {r['zero_channels_kept']} | {r['speedup']:.2f}× "
            f"| {r['stage_seconds'].get(STAGE, 0.0):.0f}{ratio} "
            f"| {100 * min(rates):.0f}–{100 * max(rates):.0f} % |"
        )
    lines.append(f"\nLatency: dense {ms['dense']:.2f} ms at batch {args.latency_batch}, "
                 f"{torch.get_num_threads()} threads, BN folded, NHWC, to_columns, paired "
                 f"medians of "
                 f"{args.latency_rounds} rounds.")  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(runs, names, out / "rates.png")
    print("\n" + "\n".join(lines))
    print(f"\nwrote {out}/results.md, results.json, rates.png in {res['seconds'] / 60:.1f} min")


def plot(runs: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(names) + 2), 3.8))
    width = 0.8 / len(runs)
    for i, (label, r) in enumerate(runs.items()):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [100 * r["rates"].get(n, 1.0) for n in names], width, label=label)
    ticks = [j + 0.4 - width / 2 for j in range(len(names))]
    labels = [n.removesuffix(".weight") for n in names]
    ax.set_xticks(ticks, labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("kept weights (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
