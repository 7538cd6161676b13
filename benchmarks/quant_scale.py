"""The exact least-squares q of ``Quantized`` against the authors' grid scan, per layer.

For every Conv/Linear weight of a model (its kept weights only, when ``--keep`` prunes it by
magnitude first) and every bit width: the squared projection error with the exact q
(:func:`admmprune.sets.quantization.best_scale`) and with the best q on the grid the authors scan
(121 scales of max|w|/L from 0.05 to 1.25, what admmprune used before), and the time of each.

    .venv/bin/python benchmarks/quant_scale.py --dense DENSE.pt   # e.g. admmnns_compare's
    .venv/bin/python benchmarks/quant_scale.py --dense DENSE.pt --keep 0.02  # its kept 2 %

Prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import admmprune as ap
from admmprune._io import safe_load
from admmprune.models import build_model

GRID = torch.linspace(0.05, 1.25, 121, dtype=torch.float64)


def grid_scale(c: ap.Quantized, x: torch.Tensor) -> float:
    """The authors' scan: the best of 121 scales of max|w| / L (max|w| for pow2)."""
    top = float(x.abs().max())
    base = top / c.L if c.levels == "uniform" else top
    errors = [c.error(x, float(q)) for q in GRID * base]
    return float(GRID[errors.index(min(errors))] * base)


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet5")
    p.add_argument("--dense", help="a state_dict to load (default: the seeded random init)")
    p.add_argument("--keep", type=float, default=1.0, help="magnitude-prune each layer first")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    p.add_argument("--out", default="benchmarks/results/quant_scale.json")
    args = p.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10, in_channels=1, input_size=28)
    if args.dense:
        model.load_state_dict(safe_load(args.dense, "--dense"))
    rows = []
    for name, W in model.named_parameters():
        if W.ndim < 2:
            continue
        x = W.detach().flatten()
        if args.keep < 1:
            x = x[ap.Unstructured(args.keep).project(x.view(1, -1)).support.flatten()]
        for bits in args.bits:
            c = ap.Quantized(bits)
            q_exact, t_exact = timed(c.scale, x)
            q_grid, t_grid = timed(grid_scale, c, x)
            e_exact, e_grid = c.error(x, q_exact), c.error(x, q_grid)
            rows.append({
                "layer": name, "weights": x.numel(), "bits": bits,
                "q_exact": q_exact, "q_grid": q_grid, "error_exact": e_exact,
                "error_grid": e_grid, "grid_excess": e_grid / e_exact - 1,
                "seconds_exact": t_exact, "seconds_grid": t_grid,
            })  # fmt: skip
    print(
        "| layer | weights | bits | q exact | q grid | grid error / exact − 1 | s exact | s grid |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['layer']} | {r['weights']:,} | {r['bits']} | {r['q_exact']:.5g} | "
            f"{r['q_grid']:.5g} | {100 * r['grid_excess']:+.2f} % | {r['seconds_exact']:.3f} | "
            f"{r['seconds_grid']:.3f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
