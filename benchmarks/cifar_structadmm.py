"""StructADMM vs magnitude filter pruning on CIFAR ResNet-20, at equal MACs and epoch budget.

1. One dense ResNet-20 (``--dense`` to reuse one) trained on the first 45,000 CIFAR-10 training
   images; accuracy on the last 5,000 (held out) and on the 1,000 official test images.
2. Three ways to the same MACs and the same epoch budget:
   - ``structadmm``: filter (channel) sets: every coupled channel group (filters, their BN, and
     every consumer across residual additions) keeps ``--keep`` of its channels; ``--admm-epochs``
     of ADMM, hard prune, then ``--retrain-epochs`` of masked retraining;
   - ``structadmm filters+columns``: groups keep ``--fc-keep`` of their channels and every block
     conv keeps a fraction of its columns (GEMM columns = kernel positions × input channels),
     chosen by bisection on the dense model so that the compact model computes the same MACs
     as the filter-only one once zero columns are skipped; same schedule;
   - ``magnitude``: the filter-only network by one-shot pruning of the channels with the
     smallest L1 norm (Li et al.'s L1-norm filter pruning, made group-aware: the norm is summed
     over every coupled producer slice), then ``--admm-epochs + --retrain-epochs`` of masked
     retraining.
3. Accuracy, MACs of the compact model (zero weights skipped), and its measured latency.

    python benchmarks/cifar_structadmm.py --data-dir ../shared/data --dense DENSE.pt

Writes ``results.md`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch

from _cifar import add_common_args, dense_checkpoint, load
from admmprune import ADMM, Columns, channel_groups, compact
from admmprune.models import build_model
from admmprune.weights.count import count
from mnist_admmnn import pct, run_recipe

BLOCK_CONVS = "layer*.conv*"
METHODS = ("structadmm", "structadmm filters+columns", "magnitude")


def compact_macs(model: torch.nn.Module, x: torch.Tensor, keep: float, columns: float) -> int:
    """MACs (zero weights skipped) of ``model`` with each channel group at ``keep`` (and block
    convs at ``columns`` of their columns), projected once from its weights and compacted."""
    m = copy.deepcopy(model).eval()
    spec = {BLOCK_CONVS: Columns(columns)} if columns < 1 else {}
    ADMM(m, spec, groups=channel_groups(m, x, keep)).prune()
    small, _ = compact(m, x, inplace=True)
    return count(small, x)["sparse_macs"]


def matching_columns(model: torch.nn.Module, x: torch.Tensor, args) -> float:
    """The block convs' column keep at which ``--fc-keep`` channels cost the MACs of ``--keep``."""
    target = compact_macs(model, x, args.keep, 1.0)
    lo, hi = 0.05, 1.0
    for _ in range(8):  # ±0.4 % of the columns: closer than one column of most layers
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if compact_macs(model, x, args.fc_keep, mid) < target else (lo, mid)
    return round(hi, 4)


def recipe(args, out: Path, dense: Path, admm_epochs: int, retrain_epochs: int, **extra) -> dict:
    sgd = {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
    return {
        "seed": args.seed,
        "device": args.device,
        "progress": False,
        "output_dir": str(out),
        "model": {"name": args.model, "checkpoint": str(dense)},
        "data": {"name": args.dataset, "dir": args.data_dir, "batch_size": args.batch_size},
        "pretrain": {"epochs": 0},
        "coupled_channels": {"keep": args.keep},
        "admm": {
            "epochs": admm_epochs,
            "optimizer": sgd,
            "schedule": {"name": "cosine"},
            "lr_reset": False,
            "updates_per_epoch": 2,
            "rho": args.rho,
            "rho_growth": args.rho_growth,
        },
        "retrain": {"epochs": retrain_epochs, "optimizer": sgd, "schedule": {"name": "cosine"}},
    } | extra


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, "benchmarks/results/cifar_structadmm")
    p.add_argument("--keep", type=float, default=0.6, help="channels kept per coupled group")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--fc-keep", type=float, default=0.75,
                   help="channels kept per group in the filters+columns run")  # fmt: skip
    p.add_argument("--admm-epochs", type=int, default=3)
    p.add_argument("--retrain-epochs", type=int, default=2)
    p.add_argument("--rho", type=float, default=0.01)
    p.add_argument("--rho-growth", type=float, default=1.5)
    args = p.parse_args()
    if args.quick:
        args.dense_epochs, args.admm_epochs, args.retrain_epochs = 2, 1, 1
        args.train_subset = args.train_subset or 5000
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load(args)
    dense_path = dense_checkpoint(args, data, out)
    budget = args.admm_epochs + args.retrain_epochs
    dense = build_model(args.model, num_classes=data.num_classes, in_channels=data.in_channels,
                        input_size=data.input_size)  # fmt: skip
    dense.load_state_dict(torch.load(dense_path, weights_only=True, map_location="cpu"))
    x1 = data.test.batch(torch.arange(1))[0]
    columns = matching_columns(dense, x1, args)
    print(f"filters+columns: channels {args.fc_keep:g}, block-conv columns {columns:g}", flush=True)
    fc = {"coupled_channels": {"keep": args.fc_keep},
          "constraints": {BLOCK_CONVS: {"columns": columns}}}  # fmt: skip
    runs = {}
    for label, (a, r, extra) in {
        "structadmm": (args.admm_epochs, args.retrain_epochs, {}),
        "structadmm filters+columns": (args.admm_epochs, args.retrain_epochs, fc),
        "magnitude": (0, budget, {"coupled_channels": {"keep": args.keep, "norm": "l1"}}),
    }.items():
        if label not in args.methods:
            continue
        t0 = time.perf_counter()
        run_dir = out / "runs" / label.replace(" ", "_")
        s = run_recipe(recipe(args, run_dir, dense_path, a, r, **extra), data)
        k = s["compact"]
        runs[label] = {
            "accuracy_test": s["accuracy"]["final"],
            "accuracy_val": s["accuracy"].get("final_val"),
            "dense_test": s["accuracy"]["start"],
            "pruned_before_retrain": s["accuracy"]["pruned_before_retrain"],
            "mac_reduction": k["macs_dense"] / k["macs_compact_sparse"],
            "columns_kept": columns if "constraints" in extra else 1.0,
            "channels_removed": k["channels_removed"],
            "not_removable": k["zero_channels_not_removable"],
            "speedup_b64": k["speedup"],
            "latency_dense_ms": k["latency_dense_ms"],
            "latency_compact_ms": k["latency_compact_ms"],
            "epochs": budget,
            "seconds": time.perf_counter() - t0,
        }
        x = runs[label]
        print(f"{label}: val {pct(x['accuracy_val'])}, test "
              f"{100 * x['accuracy_test']:.2f} %, {x['mac_reduction']:.2f}x fewer MACs, "
              f"{x['speedup_b64']:.2f}x faster, {x['seconds']:.0f} s", flush=True)  # fmt: skip
    res = {"settings": vars(args), "runs": runs, "seconds": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    d = next(iter(runs.values()))["dense_test"]
    lines = [
        f"{args.model} dense: {100 * d:.2f} % on the 1k test images. Filters: every coupled "
        f"channel group keeps {100 * args.keep:g} %; filters+columns: {100 * args.fc_keep:g} % "
        f"of the channels and {100 * columns:.1f} % of every block conv's columns; {budget} "
        "epochs after the dense model for each. MACs: of the compact model, zero weights "
        "skipped; speedup: the compact model as deployed (column zeros still computed).",
        "",
        "| method | val acc. | test acc. (1k) | before retrain | MACs × fewer | channels "
        "removed | measured speedup (b64) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, x in runs.items():
        lines.append(
            f"| {label} | {pct(x['accuracy_val'])} | {100 * x['accuracy_test']:.2f} %"
            f" | {100 * x['pruned_before_retrain']:.2f} % | {x['mac_reduction']:.2f}× | "
            f"{x['channels_removed']} | {x['speedup_b64']:.2f}× |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nwrote {out}/results.md, results.json in {res['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
