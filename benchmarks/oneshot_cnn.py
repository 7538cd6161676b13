"""One-shot pruning of a trained CNN from calibration images, no retraining: magnitude, Wanda,
SparseGPT and ADMM (admmprune.oneshot) side by side; then the short-budget question.

1. One dense model (``--dense``, e.g. mnist_admmnn.py's dense.pt; else trained here).
2. Every solver prunes a copy of it from the same ``--samples`` training images (seeded) at each
   of ``--rates`` (unstructured; LeNet-5: ADMM-NN's per-layer pattern scaled to the rate;
   ResNet-20: every conv but the first, keep 1/rate), 2:4 (every layer whose GEMM rows divide
   by 4) and columns 2x (every layer keeps half its GEMM columns; SparseGPT has no column
   mode). Test accuracy with no retraining (sequential mode), and the summed layer
   reconstruction error ||X(Ŵ − W)ᵀ||² with every solver on the *same* inputs (the dense
   model's: sequential=False), the solve seconds (layer solves; the forward passes excluded)
   and the peak bytes of Grams held.
3. The short budget at ``--budget-rates`` (the epochs of mnist_admmnn.py: 5 compression + 2
   retraining): gradual magnitude pruning, training-time ADMM, ADMM started from the one-shot
   solution (``admm.init: oneshot``) and one-shot ADMM + masked fine-tuning for all 7 epochs.

    python benchmarks/oneshot_cnn.py --data-dir ../shared/data --dense DENSE.pt
    python benchmarks/oneshot_cnn.py --model resnet20 --data-dir ../shared/data --dense DENSE.pt \\
        --skip-budget

Writes ``results.md``, ``results.json`` and ``accuracy_vs_rate.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import admmprune as ap
from _cifar import load as load_cifar
from admmprune._io import safe_load
from admmprune.run.data import load_data
from admmprune.run.stages import calibration_images
from admmprune.run.train import evaluate
from mnist_admmnn import PATTERNS, allocate, pct, recipe_for, run_recipe, train_dense

SOLVERS = ("magnitude", "wanda", "sparsegpt", "admm", "admm-fast")
# admm-fast: the same solver with a quarter of the iterations (the cost/quality trade-off)
VARIANTS = {"admm-fast": ("admm", {"iters": 10, "ramp": 8, "rho_every": 3, "cg_iters": 8})}


def layer_names(model: torch.nn.Module, kind: str) -> list[str]:
    """The constrained layers: LeNet-5's four; ResNet-20's convs but the first."""
    if kind == "lenet5":
        return ["conv1", "conv2", "fc1", "fc2"]
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[1:]


def settings(model, args) -> list[tuple[str, dict]]:
    """(label, spec) for every setting of the table."""
    names = layer_names(model, args.model)
    out = []
    for rate in args.rates:
        if args.model == "lenet5":
            keeps = allocate(model, PATTERNS["lenet5"], rate)
        else:
            keeps = dict.fromkeys(names, 1.0 / rate)
        out.append((f"{rate:g}x", {n: ap.Unstructured(k) for n, k in keeps.items()}))
    modules = dict(model.named_modules())
    nm = [n for n in names if modules[n].weight[0].numel() % 4 == 0]
    out.append(("2:4", dict.fromkeys(nm, ap.NM(2, 4))))
    out.append(("columns 2x", dict.fromkeys(names, ap.Columns(0.5))))
    return out


def one(dense, spec, calibration, solver: str, sequential: bool, options: dict):
    model = copy.deepcopy(dense)
    masks = ap.oneshot(model, spec, calibration, solver=solver, sequential=sequential, **options)
    return model, masks


def measure(args, dense, data, calibration, device) -> list[dict]:
    rows = []
    for label, spec in settings(dense, args):
        for solver in args.solvers:
            if solver == "sparsegpt" and label.startswith("columns"):
                continue
            name, options = VARIANTS.get(solver, (solver, {}))
            model, masks = one(dense, spec, calibration, name, True, options)
            acc = evaluate(model, data.test, device)[0]
            _, same = one(dense, spec, calibration, name, False, options)  # same inputs for all
            kept, total = masks.total_kept()
            rows.append({
                "setting": label, "solver": solver, "accuracy": acc,
                "rate": total / kept, "error": same.report.error,
                "layer_errors": {n: r.error for n, r in same.report.layers.items()},
                "solve_seconds": sum(r.seconds for r in same.report.layers.values()),
                "seconds": masks.report.seconds,
                "gram_bytes_peak": masks.report.gram_bytes_peak,
            })  # fmt: skip
            print(f"{label:>10} {solver:>9}: acc {pct(acc)}, error {same.report.error:.4g}, "
                  f"solve {rows[-1]['solve_seconds']:.2f} s", flush=True)  # fmt: skip
    return rows


def budget(args, dense_path: Path, data, out: Path) -> list[dict]:
    """Equal epochs (compress + retrain) for every path to the same rate."""
    ns = argparse.Namespace(
        seed=args.seed, model=args.model, dataset=args.dataset, data_dir=args.data_dir,
        batch_size=128, device=args.device, compress_epochs=args.budget_epochs[0],
        retrain_epochs=args.budget_epochs[1], admm_optimizer="adam", retrain_optimizer="adam",
        updates_per_epoch=4, rho=0.01, rounds=1, gradual_every=50,
    )  # fmt: skip
    updates = max(2, ns.compress_epochs * ns.updates_per_epoch)
    ns.rho_growth = (1.0 / ns.rho) ** (1 / (updates - 1))  # rho 0.01 → 1 (mnist_admmnn.py's)
    model = load_dense(args, data, dense_path)
    rows = []
    for rate in args.budget_rates:
        keeps = allocate(model, PATTERNS["lenet5"], rate)
        calib = {"samples": args.samples}
        paths = {
            "gradual magnitude": ("gradual", {}),
            "training-time ADMM": ("admm", {}),
            "ADMM from one-shot": ("admm", {"admm": {"init": "oneshot"}, "oneshot": calib}),
            "one-shot ADMM + fine-tuning": ("oneshot", {"oneshot": calib}),
        }
        for label, (method, extra) in paths.items():
            r = recipe_for(ns, method, keeps, dense_path, out / "runs" / f"{label}-{rate:g}")
            for key, value in extra.items():
                r[key] = {**r.get(key, {}), **value}
            if method == "oneshot":
                r["admm"]["epochs"] = 0
                r["retrain"]["epochs"] = sum(args.budget_epochs)
            tic = time.perf_counter()
            summary = run_recipe(r, data)
            rows.append({
                "rate": rate, "path": label, "accuracy": summary["accuracy"]["final"],
                "pruned_acc": summary["accuracy"]["pruned_before_retrain"],
                "seconds": time.perf_counter() - tic,
            })  # fmt: skip
            print(f"budget {rate:g}x {label}: {pct(rows[-1]['accuracy'])}", flush=True)
    return rows


def load_dense(args, data, path: Path | None):
    model = train_dense(argparse.Namespace(**vars(args), batch_size=128), data,
                        torch.device(args.device), 0)  # fmt: skip
    if path is not None:
        model.load_state_dict(safe_load(path, "--dense"))
    return model


def markdown(results: dict) -> str:
    rows = results["rows"]
    labels = list(dict.fromkeys(r["setting"] for r in rows))
    by = {(r["setting"], r["solver"]): r for r in rows}
    lines = [f"Dense: {pct(results['dense_acc'])}; {results['samples']} calibration images.", ""]
    lines += ["| solver | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for s in results["solvers"]:
        cells = [pct(by[(k, s)]["accuracy"]) if (k, s) in by else "n/a" for k in labels]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "Summed layer error (same inputs) / solve seconds:", ""]
    lines += ["| solver | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for s in results["solvers"]:
        cells = [
            f"{by[(k, s)]['error']:.3g} / {by[(k, s)]['solve_seconds']:.2f} s"
            if (k, s) in by else "n/a"
            for k in labels
        ]  # fmt: skip
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "ADMM vs SparseGPT (same inputs): layers where ADMM's error is lower or "
              "equal, and the solve time as a multiple of SparseGPT's:", ""]  # fmt: skip
    for k in labels:
        g = by.get((k, "sparsegpt"))
        for variant in ("admm", "admm-fast"):
            a = by.get((k, variant))
            if a and g:
                errs = a["layer_errors"]
                wins = sum(errs[n] <= g["layer_errors"][n] for n in errs)
                ratio = a["solve_seconds"] / max(g["solve_seconds"], 1e-9)
                lines.append(f"- {k}, {variant}: {wins}/{len(errs)} layers, {ratio:.1f}x time")
    if results.get("budget"):
        lines += ["", "| short budget | " + " | ".join(f"{r:g}x" for r in results["budget_rates"])
                  + " |", "|---|" + "---:|" * len(results["budget_rates"])]  # fmt: skip
        for path in dict.fromkeys(r["path"] for r in results["budget"]):
            cells = [pct(r["accuracy"]) for r in results["budget"] if r["path"] == path]
            lines.append(f"| {path} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in results["solvers"]:
        rows = [r for r in results["rows"] if r["solver"] == s]
        pts = [(r["rate"], r["accuracy"]) for r in rows if r["setting"][0].isdigit()
               and r["setting"].endswith("x") and "columns" not in r["setting"]]  # fmt: skip
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=s)
    ax.axhline(100 * results["dense_acc"], color="gray", ls="--", label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("compression rate of the constrained layers (unstructured)")
    ax.set_ylabel("test accuracy, no retraining (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--dataset", default="mnist", choices=("mnist", "digits", "npz"))
    p.add_argument("--model", default="lenet5", choices=("lenet5", "resnet20"))
    p.add_argument("--dense", default=None, help="dense state_dict (else trained here)")
    p.add_argument("--dense-epochs", type=int, default=10)
    p.add_argument("--samples", type=int, default=1024, help="calibration images")
    p.add_argument("--rates", type=float, nargs="+", default=[2, 5, 10, 20, 50])
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS[:4]), choices=SOLVERS)
    p.add_argument("--budget-rates", type=float, nargs="+", default=[100, 200])
    p.add_argument("--budget-epochs", type=int, nargs=2, default=[5, 2],
                   metavar=("COMPRESS", "RETRAIN"))  # fmt: skip
    p.add_argument("--skip-budget", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/oneshot_cnn")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.model == "resnet20":  # the CIFAR benchmarks' split (45k train, 5k val, 1k test)
        args.dataset = "npz" if args.dataset == "mnist" else args.dataset
        data = load_cifar(argparse.Namespace(dataset=args.dataset, data_dir=args.data_dir,
                                             seed=args.seed, train_subset=0))  # fmt: skip
    else:
        data = load_data(args.dataset, data_dir=args.data_dir, seed=args.seed)
    device = torch.device(args.device)
    if args.dense:
        dense_path = Path(args.dense)
    else:
        trained = train_dense(argparse.Namespace(**vars(args), batch_size=128), data, device,
                              args.dense_epochs)  # fmt: skip
        dense_path = out / "dense.pt"
        torch.save(trained.state_dict(), dense_path)
    dense = load_dense(args, data, dense_path).to(device).eval()
    dense_acc = evaluate(dense, data.test, device)[0]
    images = calibration_images(data.train, args.samples, args.seed)  # as `method: oneshot`
    calibration = list(images.to(device).split(256))
    print(f"dense {pct(dense_acc)}; {len(images)} calibration images", flush=True)
    results = {
        "model": args.model, "dataset": args.dataset, "dense": str(dense_path),
        "dense_acc": dense_acc, "samples": len(images), "solvers": args.solvers,
        "threads": torch.get_num_threads(), "command": " ".join(sys.argv),
        "rows": measure(args, dense, data, calibration, device),
    }  # fmt: skip
    if not args.skip_budget and args.model == "lenet5":
        results["budget_rates"] = args.budget_rates
        results["budget"] = budget(args, dense_path, data, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results)
    (out / "results.md").write_text(table)
    plot(results, out / "accuracy_vs_rate.png")
    print(table)


if __name__ == "__main__":
    main()
