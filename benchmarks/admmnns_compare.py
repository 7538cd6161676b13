"""ADMM-NN-S's question: is non-structured pruning worth it once indices and irregular compute
are paid for? Structured vs non-structured, pruned and quantized, on LeNet-5/MNIST (``--model
lenet5``) or ResNet-20/CIFAR-10 (``--model resnet20``, the shared .npz).

1. One dense model (reused from ``--dense`` when given, e.g. mnist_admmnn.py's dense.pt or the
   CIFAR benchmarks' dense.pt).
2. Pruning runs with ADMM, same budget each (``--prune-epochs`` + ``--retrain-epochs``):
   non-structured at each of ``--rates`` (LeNet-5: ADMM-NN's per-layer pattern; ResNet-20: the
   block convs, first conv and fc dense), and structured (LeNet-5: filters with their consumers'
   columns; ResNet-20: half of every coupled channel group), removed physically by compaction.
3. Quantization of every pruned model (``--quant-epochs`` of ADMM on the levels, zeros fixed):
   mixed bits (LeNet-5: conv1 5, conv2 4, fc1 3, fc2 4; ResNet-20: 4 bits, first conv and fc 8),
   ternary, binary; and the same mixed bits with the authors' masked mapping instead of ADMM.
4. For each: accuracy; storage in bits (Conv/Linear weights with their indices and codebooks,
   and without indices the way the papers count; whole file with biases); MACs (skipping zeros
   for non-structured, of the compact model for structured); CPU latency at batch 1 and 64 of
   the dense model, the non-structured model on CSR kernels, and the compact model, timed in
   alternation (compare ratios; the thread count is in the table).

    python benchmarks/admmnns_compare.py --data-dir ../shared/data \\
        --dense benchmarks/results/mnist_admmnn/dense.pt          # about 20 minutes on 2 cores
    python benchmarks/admmnns_compare.py --model resnet20 --data-dir ../shared/data \\
        --dense DENSE.pt --device cuda                             # CIFAR: use a GPU

Writes ``results.md`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from admmprune.deployment.latency import measure_paired
from admmprune.deployment.sparse import to_sparse
from admmprune.models import build_model
from admmprune.run.data import load_data
from admmprune.structure.compact import compact
from admmprune.weights.count import count
from mnist_admmnn import PATTERNS, allocate, parse_pattern, run_recipe, train_dense

# Per model: the dataset, the non-structured rates, the structured spec (coupled channel
# groups: filters go with their BN and every consumer's input slice, so compaction removes them),
# the mixed bit widths, and the optimizers of the pruning and quantization stages.
SETUPS = {
    "lenet5": {
        "dataset": "mnist",
        "rates": [100, 200],
        "structured": [
            {"layers": "conv1", "keep": 0.5},
            {"layers": "conv2", "keep": 0.4},
            {"layers": "fc1", "keep": 0.1},
        ],
        "mixed": ("mixed 5/4/3/4 bits", {"conv1": 5, "conv2": 4, "fc1": 3, "fc2": 4}),
        "optimizer": {"name": "adam", "lr": 1e-3},
        "quant_optimizer": {"name": "adam", "lr": 5e-4},
        "dense_lr": 0.01,
        "dense_wd": 0.0,
    },
    "resnet20": {
        "dataset": "npz",
        "rates": [4, 8],
        "structured": {"keep": 0.5},
        "mixed": ("4 bits (conv1, fc 8)", {"conv1": 8, "layer*": 4, "fc": 8}),
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4},
        "quant_optimizer": {"name": "sgd", "lr": 0.005, "momentum": 0.9},
        "dense_lr": 0.1,
        "dense_wd": 5e-4,
    },
}


KINDS = ("non-structured", "structured")
QUANTIZERS = ("mixed", "masked", "ternary", "binary")  # the keys of main()'s quant table


def nonstructured(model_name: str, dense: torch.nn.Module, rate: float) -> dict:
    """Unstructured constraints keeping 1/``rate`` of the constrained layers' weights."""
    if model_name == "lenet5":
        keeps = allocate(dense, PATTERNS["lenet5"], rate)
        return {n: {"unstructured": k} for n, k in keeps.items()}
    return {"layer*.conv*": {"unstructured": 1 / rate}}


def base_recipe(args, out: Path, start: Path, constraints, structured: bool) -> dict:
    """``constraints``: a constraints dict, or (``structured``) the coupled_channels spec."""
    return {
        "seed": args.seed,
        "device": args.device,
        "progress": False,
        "output_dir": str(out),
        "model": {"name": args.model, "checkpoint": str(start)},
        "data": {"name": args.dataset, "dir": args.data_dir, "batch_size": args.batch_size},
        "constraints": {} if structured else constraints,
        "coupled_channels": constraints if structured else None,
    }


def prune_recipe(args, out: Path, dense: Path, constraints, structured: bool) -> dict:
    opt = SETUPS[args.model]["optimizer"]
    r = base_recipe(args, out, dense, constraints, structured)
    r.update(
        admm={
            "epochs": args.prune_epochs,
            "optimizer": opt,
            "updates_per_epoch": 4,
            "rho": 0.01,
            "rho_growth": (1.0 / 0.01) ** (1 / max(1, 4 * args.prune_epochs - 1)),
        },
        retrain={
            "epochs": args.retrain_epochs,
            "optimizer": opt,
            "schedule": {"name": "cosine"},
        },
    )
    return r


def quant_recipe(
    args, out: Path, pruned: Path, constraints, structured: bool, layers, method: str
) -> dict:
    """Start from the pruned model; the same constraints re-derive its exact support (its
    non-zeros are the top-k), then only the quantize stage trains."""
    r = base_recipe(args, out, pruned, constraints, structured)
    r["retrain"] = {"epochs": 0}
    r["quantize"] = {
        "epochs": args.quant_epochs,
        "layers": layers,
        "method": method,
        "rho": 1e-3,
        "rho_growth": 10 ** (3 / max(1, 2 * args.quant_epochs - 1)),  # 1e-3 → 1 at the end
        "updates_per_epoch": 2,
        "optimizer": SETUPS[args.model]["quant_optimizer"],
        "schedule": {"name": args.quant_schedule},
    }
    return r


def row_for(name: str, kind: str, summary: dict, run_dir: Path, dense_model, x1, xb, rounds):
    st = summary["storage"]
    spec = dict(st["model_spec"])
    model = build_model(spec.pop("name"), **spec)
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True, map_location="cpu"))
    model.eval()
    c = count(model, x1)
    if kind == "structured":
        fast, _ = compact(model, x1)
        macs = count(fast, x1)["macs"]
    else:
        fast, macs = to_sparse(model), c["sparse_macs"]
    lat = {}
    for x in (x1, xb):
        t = measure_paired({"dense": dense_model, "pruned": fast}, x, rounds)
        lat[f"b{x.shape[0]}"] = {"dense_ms": t["dense"], "ms": t["pruned"]}
    return {
        "config": name,
        "kind": kind,
        "accuracy": summary["accuracy"]["final"],
        "accuracy_val": summary["accuracy"].get("final_val"),
        "accuracy_before_quantization": summary["accuracy"].get("dense"),
        "nonzero_weights": sum(layer["kept"] for layer in summary["layers"]),
        "weights_bits": st["weights_bits"],
        "weights_rate": st["weights_rate"],
        "weights_rate_without_index": st["weights_rate_without_index"],
        "weights_index_bits": st["weights_index_bits"],
        "index_bound_bits": st["index_bound_bits"],
        "file_bytes": st["file_bytes"],
        "total_rate": st["rate"],
        "formats": st["formats"],
        "macs": macs,
        "mac_reduction": c["macs"] / max(macs, 1),
        "latency": lat,
    }


def markdown(res: dict) -> str:
    lines = [
        f"Dense {res['settings']['model']}: {100 * res['dense_acc']:.2f} % "
        f"({res['test_images']:,} test images), "
        f"{res['dense_weights_bits'] / 8 / 1024:.0f} KiB of fp32 Conv/Linear weights. "
        f"Latency: CPU, {res['threads']} threads, medians of {res['rounds']} paired runs.",
        "",
        "| config | kind | acc. | non-zeros | weights storage (bits) | × vs fp32 | × without "
        "index | file bytes | MACs × fewer | b1: dense → ms | b64: dense → ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        b1, b64 = r["latency"]["b1"], r["latency"]["b64"]
        lines.append(
            f"| {r['config']} | {r['kind']} | {100 * r['accuracy']:.2f} % | "
            f"{r['nonzero_weights']:,} | {r['weights_bits']:,} | {r['weights_rate']:.0f}× | "
            f"{r['weights_rate_without_index']:.0f}× | {r['file_bytes']:,} | "
            f"{r['mac_reduction']:.1f}× | {b1['dense_ms']:.3f} → {b1['ms']:.3f} | "
            f"{b64['dense_ms']:.2f} → {b64['ms']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="lenet5", choices=sorted(SETUPS))
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--dataset",
        default=None,
        choices=("mnist", "npz", "digits"),
        help="default: mnist for lenet5, npz (the shared CIFAR-10) for resnet20",
    )
    p.add_argument("--dense", default=None, help="dense state_dict to start from")
    p.add_argument("--dense-epochs", type=int, default=10)
    p.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=None,
        help="non-structured compression rates (default: lenet5 100 200, resnet20 4 8)",
    )
    p.add_argument("--prune-epochs", type=int, default=5)
    p.add_argument("--retrain-epochs", type=int, default=2)
    p.add_argument("--quant-epochs", type=int, default=2)
    p.add_argument(
        "--quant-schedule",
        choices=("cosine", "constant"),
        default="cosine",
        help="learning rate in the quantization stage (cosine ends at 0 while rho is largest)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-subset", type=int, default=0, help="train on the first N images")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--device", default="cpu", help="where to train; latency is always CPU")
    p.add_argument("--quick", action="store_true", help="one rate, 1-epoch stages, 10k images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default benchmarks/results/admmnns_compare[_MODEL]")
    for flag, choices, what in (
        ("--kinds", KINDS, "which pruned models to build"),
        ("--quantizers", QUANTIZERS, "which quantizations of each pruned model (default: all; "
         "masked mapping only of the non-structured ones)"),
    ):  # fmt: skip
        p.add_argument(flag, nargs="+", choices=choices, help=what)
    p.add_argument(
        "--structured",
        nargs="+",
        metavar="LAYER=KEEP",
        help="LeNet-5: the share of filters/neurons each layer keeps, e.g. conv1=0.5 conv2=0.4 "
        "fc1=0.1 (the default)",
    )
    p.add_argument(
        "--bits",
        nargs="+",
        metavar="LAYER=BITS",
        help="the mixed bit widths, e.g. conv1=5 conv2=4 fc1=3 fc2=4 (the LeNet-5 default)",
    )
    args = p.parse_args()
    setup = SETUPS[args.model]
    if args.model != "lenet5" and (args.structured or args.bits):
        p.error("--structured and --bits are for --model lenet5")
    if args.model == "lenet5":
        keeps = {x["layers"]: x["keep"] for x in setup["structured"]}
        keeps = parse_pattern(p, args.structured, keeps, "--structured")
        setup = {**setup, "structured": [{"layers": k, "keep": v} for k, v in keeps.items()]}
        bits = parse_pattern(p, args.bits, setup["mixed"][1], "--bits", kind=int, high=16)
        label = "/".join(str(b) for b in bits.values())
        setup["mixed"] = (f"mixed {label} bits", bits)
    args.dataset = args.dataset or setup["dataset"]
    args.rates = args.rates or setup["rates"]
    if args.quick:
        args.rates = args.rates[:1]
        args.prune_epochs = args.retrain_epochs = args.quant_epochs = 1
        args.dense_epochs = min(args.dense_epochs, 2)
        args.train_subset = args.train_subset or 10000
    suffix = "" if args.model == "lenet5" else f"_{args.model}"
    out = Path(args.out or f"benchmarks/results/admmnns_compare{suffix}")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    # npz (CIFAR-10): the last 5,000 training images are held out, never trained on
    val = 5000 if args.dataset == "npz" else 0
    data = load_data(args.dataset, data_dir=args.data_dir, val_size=val, seed=args.seed)
    if args.train_subset:
        data.train = data.train.subset(torch.arange(min(args.train_subset, len(data.train))))
    device = torch.device(args.device)
    spec = {"num_classes": data.num_classes, "in_channels": data.in_channels,
            "input_size": data.input_size}  # fmt: skip
    if args.dense:
        dense_path = Path(args.dense)
        dense = build_model(args.model, **spec)
        dense.load_state_dict(torch.load(dense_path, weights_only=True, map_location="cpu"))
    else:
        dense = train_dense(args, data, device, args.dense_epochs, lr=setup["dense_lr"],
                            weight_decay=setup["dense_wd"]).cpu()  # fmt: skip
        dense_path = out / "dense.pt"
        torch.save(dense.state_dict(), dense_path)
    dense.eval()
    x1 = data.test.batch(torch.arange(1))[0]
    xb = data.test.batch(torch.arange(64))[0]
    from admmprune.run.train import evaluate

    dense_acc = evaluate(dense, data.test, torch.device("cpu"))[0]
    print(f"dense: {100 * dense_acc:.2f} %", flush=True)

    pruned = {}
    args.kinds = args.kinds or list(KINDS)
    if "non-structured" in args.kinds:
        for rate in args.rates:
            pruned[f"non-structured {rate:g}x"] = (False, nonstructured(args.model, dense, rate))
    if "structured" in args.kinds:
        pruned["structured"] = (True, setup["structured"])
    mixed_name, mixed = setup["mixed"]
    quant = {  # --quantizers key → (table name, layers, method)
        "mixed": (mixed_name, mixed, "admm"),
        "masked": (f"{mixed_name.split(' (')[0]}, masked mapping", mixed, "masked_mapping"),
        "ternary": ("ternary", {"*": "ternary"}, "admm"),
        "binary": ("binary", {"*": "binary"}, "admm"),
    }
    quant = {name: q for key, (name, *q) in quant.items() if key in (args.quantizers or quant)}
    rows = []
    for i, (pname, (structured, constraints)) in enumerate(pruned.items()):
        kind = "structured" if structured else "non-structured"
        t0 = time.perf_counter()
        pdir = out / "runs" / f"prune{i}"
        recipe = prune_recipe(args, pdir, dense_path, constraints, structured)
        summary = run_recipe(recipe, data)
        rows.append(row_for(pname, kind, summary, pdir, dense, x1, xb, args.rounds))
        print(f"{pname}: {100 * summary['accuracy']['final']:.2f} %, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        for j, (qname, (layers, method)) in enumerate(quant.items()):
            if structured and method == "masked_mapping" and args.quantizers is None:
                continue  # by default one comparison of the two quantizers is enough
            t0 = time.perf_counter()
            qdir = out / "runs" / f"prune{i}_quant{j}"
            recipe = quant_recipe(
                args, qdir, pdir / "model.pt", constraints, structured, layers, method
            )
            s = run_recipe(recipe, data)
            rows.append(row_for(f"{pname} + {qname}", kind, s, qdir, dense, x1, xb, args.rounds))
            print(f"{pname} + {qname}: {100 * s['accuracy']['final']:.2f} %, "
                  f"weights {s['storage']['weights_rate']:.0f}x "
                  f"({s['storage']['weights_rate_without_index']:.0f}x without index), "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
    res = {
        "settings": vars(args),
        "dense_acc": dense_acc,
        "test_images": len(data.test),
        "dense_weights_bits": sum(
            32 * m.weight.numel()
            for m in dense.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
        ),
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "rows": rows,
        "seconds": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(res, indent=2))
    table = markdown(res)
    (out / "results.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nwrote {out}/results.md, results.json in {res['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
