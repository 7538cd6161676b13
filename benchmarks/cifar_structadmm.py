"""StructADMM vs magnitude filter pruning on CIFAR ResNet-20, at equal MACs and epoch budget.

1. One dense ResNet-20 (``--dense`` to reuse one) trained on the first 45,000 CIFAR-10 training
   images; accuracy on the last 5,000 (held out) and on the 1,000 official test images.
2. Both methods remove whole channels through the coupled channel groups (filters, their BN, and
   every consumer across residual additions), keeping ``--keep`` of every group, so both end at
   the same physically smaller network:
   - ``structadmm``: ``--admm-epochs`` of ADMM on the group sets, hard prune, then
     ``--retrain-epochs`` of masked retraining;
   - ``magnitude``: one-shot pruning of the groups with the smallest L2 norm (Li et al.'s filter
     pruning, with the L2 instead of the L1 norm, and group-aware), then ``--admm-epochs +
     --retrain-epochs`` of masked retraining: the same budget.
3. Accuracy, MACs of the compact model, and measured CPU latency dense vs compact.

    python benchmarks/cifar_structadmm.py --data-dir ../shared/data --dense DENSE.pt

Writes ``results.md`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar import add_common_args, dense_checkpoint, load
from mnist_admmnn import pct, run_recipe


def recipe(args, out: Path, dense: Path, admm_epochs: int, retrain_epochs: int) -> dict:
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
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, "benchmarks/results/cifar_structadmm")
    p.add_argument("--keep", type=float, default=0.6, help="channels kept per coupled group")
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
    runs = {}
    for label, (a, r) in {
        "structadmm": (args.admm_epochs, args.retrain_epochs),
        "magnitude": (0, budget),
    }.items():
        t0 = time.perf_counter()
        s = run_recipe(recipe(args, out / "runs" / label, dense_path, a, r), data)
        k = s["compact"]
        runs[label] = {
            "accuracy_test": s["accuracy"]["final"],
            "accuracy_val": s["accuracy"].get("final_val"),
            "dense_test": s["accuracy"]["start"],
            "pruned_before_retrain": s["accuracy"]["pruned_before_retrain"],
            "mac_reduction": k["mac_reduction"],
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
    d = runs["structadmm"]["dense_test"]
    lines = [
        f"ResNet-20 dense: {100 * d:.2f} % on the 1k test images; every coupled channel group "
        f"keeps {100 * args.keep:g} %; {budget} epochs after the dense model for both.",
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
