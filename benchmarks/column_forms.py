"""Where column (shape) pruning can win time, layer by layer: each distinct conv of a model,
its GEMM columns pruned to ``keep`` (the L2-largest, as ``Columns`` keeps them), timed in
alternation at one batch size (channels-last):

- ``dense``: the conv itself;
- ``offsets``: :class:`admmprune.sparse.ColumnConv2d`'s offset form (gather the kept im2col
  columns, then a GEMM with the kept weights);
- ``GEMM only``: that form's GEMM alone, on columns gathered beforehand, into an output
  allocated beforehand: a lower bound for any form that gathers the kept columns and then
  multiplies, since it does nothing but the kept MACs.

A layer can gain from column pruning through a gather + GEMM only where ``GEMM only`` is well
below ``dense``; the totals row sums the layers (each distinct shape counted as often as the
model has it).

    python benchmarks/column_forms.py [--model resnet56] [--keep 0.5 0.25] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from admmprune import Columns, prune
from admmprune.latency import measure_paired
from admmprune.models import build_model
from admmprune.sparse import ColumnConv2d


class _GemmOnly(nn.Module):
    """The offset form's GEMM on pre-gathered columns, into a pre-allocated output."""

    def __init__(self, offsets: ColumnConv2d, x: torch.Tensor) -> None:
        super().__init__()
        stride, padding, dilation, _ = offsets.conv_args
        kh, kw = offsets.kernel_size
        N, _, H, W = x.shape
        Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        K = offsets.W.shape[1]
        self.cols = torch.randn(N * Ho * Wo, K)
        self.Wk = offsets.W.view(offsets.out_channels, K)
        self.out = torch.empty(N * Ho * Wo, offsets.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(self.cols, self.Wk.t(), out=self.out)


def conv_inputs(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Conv2d, tuple[int, ...]]]:
    """Every groups=1 Conv2d with a kernel larger than 1×1 and the shape of its input."""
    seen = []
    hooks = [
        m.register_forward_pre_hook(lambda m, a: seen.append((m, tuple(a[0].shape))))
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.weight[0, 0].numel() > 1
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet56")
    p.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--tile-mib", type=float, help="ColumnConv2d.tile_bytes, in MiB")
    p.add_argument("--out", default="benchmarks/results/column_forms.json")
    args = p.parse_args()
    if args.tile_mib:
        ColumnConv2d.tile_bytes = int(args.tile_mib * 2**20)
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10, in_channels=3, input_size=32).eval()
    layers = conv_inputs(model, torch.randn(1, 3, 32, 32))
    shapes = Counter(
        (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, s[2:])
        for m, s in layers
    )
    print(f"{args.model}, batch {args.batch}, CPU {torch.get_num_threads()} threads, NHWC, "
          f"tiles of {ColumnConv2d.tile_bytes / 2**20:g} MiB; medians of {args.rounds} paired "
          "runs (ms)\n")  # fmt: skip
    print("| keep | layer (in→out, map) | count | dense | offsets | GEMM only | bound speedup |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    rows = []
    for keep in args.keep:
        total = Counter()
        for (cin, cout, k, stride, pad, hw), n in shapes.items():
            conv = nn.Conv2d(cin, cout, k, stride, pad)
            prune(conv, {nn.Conv2d: Columns(keep)})
            x = torch.randn(args.batch, cin, *hw).contiguous(memory_format=torch.channels_last)
            offsets = ColumnConv2d(conv, "offsets")
            forms = {
                "dense": ColumnConv2d(conv, "dense").to(memory_format=torch.channels_last),
                "offsets": offsets,
                "gemm": _GemmOnly(offsets, x),
            }
            with torch.no_grad():
                ref = functional.conv2d(x, conv.weight, conv.bias, stride, pad)
                assert torch.allclose(offsets(x), ref, rtol=1e-4, atol=1e-4)
                ms = measure_paired(forms, x, args.rounds)
            for f, t in ms.items():
                total[f] += n * t
            row = {"keep": keep, "in": cin, "out": cout, "map": list(hw), "stride": stride,
                   "count": n, **{f"{f}_ms": t for f, t in ms.items()}}  # fmt: skip
            rows.append(row)
            print(f"| {keep:g} | {cin}→{cout}, {hw[0]}×{hw[1]}, stride {stride[0]} | {n} | "
                  f"{ms['dense']:.2f} | {ms['offsets']:.2f} | {ms['gemm']:.2f} | "
                  f"{ms['dense'] / ms['gemm']:.2f}x |")  # fmt: skip
        # the best any gather + GEMM form can do per layer is min(dense, GEMM only)
        bound = sum(
            r["count"] * min(r["dense_ms"], r["gemm_ms"]) for r in rows if r["keep"] == keep
        )
        print(f"| {keep:g} | **all layers** | {sum(shapes.values())} | {total['dense']:.1f} | "
              f"{total['offsets']:.1f} | {total['gemm']:.1f} | "
              f"{total['dense'] / bound:.2f}x (of {1 / keep:g}x MACs) |")  # fmt: skip
        rows.append({"keep": keep, "total": True, "dense_ms": total["dense"],
                     "offsets_ms": total["offsets"], "gemm_ms": total["gemm"],
                     "bound_speedup": total["dense"] / bound})  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(),
            "tile_bytes": ColumnConv2d.tile_bytes}  # fmt: skip
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
