"""Does structured sparsity become speed? At 2x / 4x / 8x MAC reduction, three kinds:

- ``channels`` (filter = channel pruning once coupling is respected: a producer's filter is its
  consumers' input channel): every dependency group (channels coupled by BN, residual additions,
  concatenations) keeps the same fraction f of its channels, those with the largest L2 norm over
  all producer slices, and the model is compacted;
- ``columns`` (shape-wise): every conv keeps the same fraction of its GEMM columns, computed by
  :class:`admmprune.deployment.sparse.ColumnConv2d` in the form ``to_columns`` measures fastest per
  layer at each timed batch size (the dense conv, a smaller conv on the alive channels, or the kept
  columns grouped by kernel offset into one 1×1 conv); the forms chosen are in the JSON;
- ``filters+columns``: channels compacted to sqrt(R), then columns to the rest.

The fraction is found by bisection so the MACs are 1/R of the dense model's. Dense and pruned are
timed in alternation (paired, so the machine's noise hits both alike) at batch 1 and 64, and we
report speedup / MAC reduction (1.0 is the physical limit).

    python benchmarks/structured_speed.py [--models resnet20 resnet56 vgg16] [--rounds 20]
    python benchmarks/structured_speed.py --device cuda --batches 1 64 512   # on a GPU

Both models are timed as deployed (``admmprune.deployment.latency.inference_form``): BatchNorm
folded into the convs (unless ``--no-fold-bn``) and channels-last (unless ``--memory-format nchw``),
which is where thin (pruned) layers lose the least to per-channel overheads.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from admmprune import Columns, deploy, prune
from admmprune.deployment.latency import inference_form, measure_paired
from admmprune.deployment.sparse import ColumnConv2d, to_columns
from admmprune.models import build_model
from admmprune.run.train import resolve_device
from admmprune.structure.compact import compact
from admmprune.structure.graph import output_layers
from admmprune.weights.count import count


def zero_weakest_channels(model: nn.Module, x: torch.Tensor, keep: float) -> None:
    """In every group keep ``keep`` of the channels (largest producer norm), zero the rest."""
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    groups = DG.get_all_groups(
        ignored_layers=output_layers(model, x), root_module_types=[nn.Conv2d, nn.Linear]
    )
    with torch.no_grad():
        for group in groups:
            n = len(group.items[0].idxs)
            producers = [
                (item.dep.target.module, [int(i) for i in item.idxs])
                for item in group.items
                if item.dep.handler.__name__ == "prune_out_channels"
                and len(item.idxs) == n
                and getattr(item.dep.target.module, "weight", None) is not None
            ]
            score = torch.zeros(n)
            for m, idxs in producers:
                w = m.weight.detach()
                score += w[idxs].reshape(n, -1).pow(2).sum(1) if w.ndim > 1 else w[idxs].pow(2)
            k = max(1, round(keep * n))
            drop = score.argsort(descending=True)[k:].tolist()
            for m, idxs in producers:
                for j in drop:
                    m.weight[idxs[j]] = 0
                    if getattr(m, "bias", None) is not None:
                        m.bias[idxs[j]] = 0


def _bisect(make, dense_macs: float, reduction: float):
    """``make(keep) -> (model, macs)``; the keep whose MAC reduction is closest to ``reduction``."""
    lo, hi, best = 0.02, 1.0, None
    for _ in range(12):
        keep = (lo + hi) / 2
        model, macs = make(keep)
        r = dense_macs / macs
        if best is None or abs(r - reduction) < abs(best[2] - reduction):
            best = (model, keep, r)
        lo, hi = (lo, keep) if r < reduction else (keep, hi)
        if abs(r - reduction) / reduction < 0.02:
            break
    return best


def compacted_at(model: nn.Module, x: torch.Tensor, reduction: float):
    def make(keep):
        masked = copy.deepcopy(model)
        zero_weakest_channels(masked, x, keep)
        small, _ = compact(masked, x, inplace=True)
        return small, count(small, x)["macs"]

    return _bisect(make, count(model, x)["macs"], reduction)


def columns_at(model: nn.Module, x: torch.Tensor, reduction: float):
    """The column-pruned model, still masked (``timed_form`` picks its layers' forms)."""

    def make(keep):
        masked = copy.deepcopy(model)
        prune(masked, {nn.Conv2d: Columns(keep)})
        return masked, count(masked, x)["sparse_macs"]

    return _bisect(make, count(model, x)["macs"], reduction)


def pruned_at(kind: str, model: nn.Module, x: torch.Tensor, reduction: float):
    if kind == "channels":
        return compacted_at(model, x, reduction)
    if kind == "columns":
        return columns_at(model, x, reduction)
    small, keep_c, r_c = compacted_at(model, x, reduction**0.5)
    fast, keep_k, r_k = columns_at(small, x, reduction / r_c)
    return fast, keep_c * keep_k, count(model, x)["macs"] / (count(small, x)["macs"] / r_k)


def timed_form(model: nn.Module, x: torch.Tensor, kind: str, form: dict):
    """``model`` and ``x`` as deployed (BN folded first, then NHWC); column kinds then get each
    layer's fastest form measured on this very input; returns the forms chosen too."""
    model, x = inference_form(model, x, **form)
    if kind == "channels":
        return model, x, {}
    fast = to_columns(model, x)
    forms = {n: m.form for n, m in fast.named_modules() if isinstance(m, ColumnConv2d)}
    return fast, x, forms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "vgg16"])
    p.add_argument("--reductions", type=float, nargs="+", default=[2, 4, 8])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument(
        "--kinds", nargs="+", default=["channels", "columns", "filters+columns"],
        choices=["channels", "columns", "filters+columns"],
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="where to time (pruning is done on the CPU)")
    p.add_argument(
        "--memory-format", default="nhwc", choices=("nhwc", "nchw"),
        help="time both models channels-last (oneDNN's fast layout; default) or NCHW",
    )  # fmt: skip
    p.add_argument("--no-fold-bn", action="store_true", help="time BatchNorm unfolded")
    p.add_argument(
        "--deploy", action="store_true",
        help="time both as admmprune.deploy serves them (BN folded, NHWC, to_columns, then "
        "eager or torch.compile by measurement); --memory-format / --no-fold-bn do not apply",
    )  # fmt: skip
    p.add_argument("--out", default="benchmarks/results/structured_speed.json")
    args = p.parse_args()
    if args.deploy and (args.memory_format != "nhwc" or args.no_fold_bn):
        p.error("--deploy folds BN and runs NHWC itself: drop --memory-format / --no-fold-bn")
    torch.manual_seed(0)
    device = resolve_device(args.device)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    rows = []
    form = {"channels_last": args.memory_format == "nhwc", "fold_bn": not args.no_fold_bn}
    bn = "BN folded" if form["fold_bn"] else "BN unfolded"
    bn += ", admmprune.deploy" if args.deploy else ""
    print(f"{where}, {args.memory_format.upper()}, {bn}; medians of {args.rounds} paired runs\n")
    print(
        "| model | kind | MAC reduction | kept | stored non-zeros | batch | dense ms | pruned ms | "
        "speedup | speedup / MAC reduction |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        model = build_model(name, num_classes=10, in_channels=3, input_size=32).eval()
        timed_dense = copy.deepcopy(model).to(device)  # pruning happens on the CPU copy
        x1 = torch.randn(1, 3, 32, 32)
        dense = count(model, x1)
        for kind, reduction in [(k, r) for k in args.kinds for r in args.reductions]:
            small, keep, got = pruned_at(kind, model, x1, reduction)
            params = sum(int(torch.count_nonzero(t)) for t in small.state_dict().values())
            small = small.to(device)
            for batch in args.batches:
                xb = torch.randn(batch, 3, 32, 32, device=device)
                if args.deploy:
                    dense_form, compact_form = deploy(timed_dense, xb), deploy(small, xb)
                    xf = xb.contiguous(memory_format=torch.channels_last)
                    forms = {"dense": dense_form.report.choice,
                             "compact": compact_form.report.choice}  # fmt: skip
                else:
                    dense_form, xf = inference_form(timed_dense, xb, **form)
                    compact_form, _, forms = timed_form(small, xb, kind, form)
                pair = {"dense": dense_form, "compact": compact_form}
                t = measure_paired(pair, xf, args.rounds)
                td, ts = t["dense"], t["compact"]
                row = {
                    "device": where,
                    "memory_format": args.memory_format,
                    "fold_bn": form["fold_bn"],
                    "model": name,
                    "kind": kind,
                    "target_reduction": reduction,
                    "mac_reduction": got,
                    "kept_fraction": keep,
                    "params_dense": dense["params"],
                    "params": params,
                    "batch": batch,
                    "dense_ms": td,
                    "compact_ms": ts,
                    "speedup": td / ts,
                    "speedup_per_mac_reduction": td / ts / got,
                    "column_forms" if not args.deploy else "deploy_choice": forms,
                }
                rows.append(row)
                print(
                    f"| {name} | {kind} | {got:.2f}x | {keep:.2f} | {params:,} | {batch} | "
                    f"{td:.2f} | {ts:.2f} | {td / ts:.2f}x | "
                    f"{td / ts / got:.2f} |",
                    flush=True,
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": where,
                "threads": torch.get_num_threads(),
                "rounds": args.rounds,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
