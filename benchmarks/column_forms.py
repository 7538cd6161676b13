"""Where column (shape) pruning can win time, layer by layer: each distinct conv of a model,
its GEMM columns pruned to ``keep`` (the L2-largest, as ``Columns`` keeps them), timed in
alternation at one batch size (channels-last):

- ``dense``: the conv itself;
- ``offsets``: :class:`admmprune.deployment.sparse.ColumnConv2d`'s offset form (gather the kept
  im2col columns, then a GEMM with the kept weights);
- ``GEMM only``: that form's GEMM alone, on columns gathered beforehand, into an output
  allocated beforehand: a lower bound for any form that gathers the kept columns and then
  multiplies, since it does nothing but the kept MACs;
- ``views`` (stride-1 3×3 convs only): no gather at all, for a column set that does not exist
  in admmprune: the same number of kept columns, but at every kernel offset the first
  ``keep·C`` input channels, so each offset is one batched GEMM on a strided view of the padded
  input (computed over the padded width, the extra outputs dropped). It says what a column
  constraint shaped for speed could at best buy.

A layer can gain from column pruning through a gather + GEMM only where ``GEMM only`` is well
below ``dense``; the totals row sums the layers (each distinct shape counted as often as the
model has it; ``views`` counts dense time where it does not apply).

    python benchmarks/column_forms.py [--model resnet56] [--keep 0.5 0.25] [--batch 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from admmprune import Columns, prune
from admmprune.deployment.latency import measure_paired
from admmprune.deployment.sparse import ColumnConv2d
from admmprune.models import build_model


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


class _PrefixViews(nn.Module):
    """``y = b + Σ_(i,j) x̃[:, :n, i + p, j + q] · W[:, :n, i, j]ᵀ``: per kernel offset one batched
    GEMM on a view of the padded NHWC input (rows over the padded width, so a view needs no
    copy), the outputs of the padding columns dropped at the end."""

    def __init__(self, conv: nn.Conv2d, n: int) -> None:
        super().__init__()
        W = conv.weight.detach()
        self.n = n
        self.Wt = [W[:, :n, i, j].t().contiguous() for i in range(3) for j in range(3)]
        self.b = conv.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, Wd = x.shape
        Hp, Wp = H + 3, Wd + 2  # one row more, so the last rows of every view stay in bounds
        xp = functional.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 2)).reshape(N, Hp * Wp, C)
        R, out = H * Wp, self.Wt[0].shape[1]
        y = self.b.expand(N, R, out).contiguous()
        for o, Wt in enumerate(self.Wt):
            s = (o // 3) * Wp + o % 3
            y.baddbmm_(xp[:, s : s + R, : self.n], Wt.expand(N, -1, -1))
        return y.view(N, H, Wp, out)[:, :, :Wd].permute(0, 3, 1, 2)


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
    print("| keep | layer (in→out, map) | count | dense | offsets | GEMM only | bound speedup "
          "| views |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
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
            views = k == (3, 3) and stride == (1, 1) and pad == (1, 1)
            if views:
                prefix = copy.deepcopy(conv)
                c = max(1, round(keep * cin))
                with torch.no_grad():
                    prefix.weight[:, c:] = 0
                forms["views"] = _PrefixViews(prefix, c)
            with torch.no_grad():
                ref = functional.conv2d(x, conv.weight, conv.bias, stride, pad)
                assert torch.allclose(offsets(x), ref, rtol=1e-4, atol=1e-4)
                if views:
                    want = functional.conv2d(x, prefix.weight, prefix.bias, stride, pad)
                    assert torch.allclose(forms["views"](x), want, rtol=1e-4, atol=1e-4)
                ms = measure_paired(forms, x, args.rounds)
            ms.setdefault("views", float("nan"))
            for f, t in ms.items():
                total[f] += n * (ms["dense"] if math.isnan(t) else t)  # views do not apply
            row = {"keep": keep, "in": cin, "out": cout, "map": list(hw), "stride": stride,
                   "count": n,
                   **{f"{f}_ms": None if math.isnan(t) else t for f, t in ms.items()}}  # fmt: skip
            rows.append(row)
            print(f"| {keep:g} | {cin}→{cout}, {hw[0]}×{hw[1]}, stride {stride[0]} | {n} | "
                  f"{ms['dense']:.2f} | {ms['offsets']:.2f} | {ms['gemm']:.2f} | "
                  f"{ms['dense'] / ms['gemm']:.2f}x | {ms['views']:.2f} |")  # fmt: skip
        # the best any gather + GEMM form can do per layer is min(dense, GEMM only)
        bound = sum(
            r["count"] * min(r["dense_ms"], r["gemm_ms"]) for r in rows if r["keep"] == keep
        )
        print(f"| {keep:g} | **all layers** | {sum(shapes.values())} | {total['dense']:.1f} | "
              f"{total['offsets']:.1f} | {total['gemm']:.1f} | "
              f"{total['dense'] / bound:.2f}x (of {1 / keep:g}x MACs) | "
              f"{total['views']:.1f} |")  # fmt: skip
        rows.append({"keep": keep, "total": True, "dense_ms": total["dense"],
                     "offsets_ms": total["offsets"], "gemm_ms": total["gemm"],
                     "views_ms": total["views"],
                     "bound_speedup": total["dense"] / bound})  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(),
            "tile_bytes": ColumnConv2d.tile_bytes}  # fmt: skip
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
