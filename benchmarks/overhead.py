"""ADMM's cost inside a training loop, and the cost of one Z/U update at scale.

1. Time per training step of a ResNet-18 (torchvision, 10 classes, 32×32 input) on CPU:
   plain vs ADMM ``mode="penalty"`` vs ADMM ``mode="grad"``. The three are interleaved round by
   round so machine noise hits them alike; we report medians and the overhead ratios.
2. Time of one ``ADMM.update()`` on a model with >= 100 M constrained parameters, per constraint.
3. Time of one ``SSAuto.update()`` on CIFAR ResNet-20, coupled rows off and on.

Targets (issue #2): step overhead <= 10 %; the 100 M update under 2 s on 2 cores.

    python benchmarks/overhead.py [--batch 32] [--rounds 15] [--big 100]
    python benchmarks/overhead.py --ssauto-against REV   # part 3 only, paired against a git rev
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import admmprune as ap


def step_times(batch: int, rounds: int, seed: int) -> dict[str, list[float]]:
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    setups = {}
    for variant in ("plain", "penalty", "grad"):
        torch.manual_seed(seed)
        model = torchvision.models.resnet18(num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        admm = None
        if variant != "plain":
            admm = ap.ADMM(model, {}, default=ap.Unstructured(0.1), rho=1e-3, mode=variant)
        setups[variant] = (model, opt, admm)

    def step(model, opt, admm):
        loss = nn.functional.cross_entropy(model(x), y)
        if admm is not None and admm.mode == "penalty":
            loss = loss + admm.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for s in setups.values():  # warm-up
        step(*s)
        step(*s)
    times: dict[str, list[float]] = {v: [] for v in setups}
    order = list(setups)
    for r in range(rounds):
        for v in order[r % 3 :] + order[: r % 3]:  # rotate so no variant always runs first
            t0 = time.perf_counter()
            step(*setups[v])
            times[v].append(time.perf_counter() - t0)
    return times


def update_times(million: int, repeats: int) -> dict[str, float]:
    side = 5000
    layers = max(1, round(million * 1e6 / side**2))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(side, side, bias=False) for _ in range(layers)])
    n = sum(p.numel() for p in model.parameters())
    out = {"constrained_params": n}
    for label, c in {
        "unstructured(0.05)": ap.Unstructured(0.05),
        "filters(0.25)": ap.Filters(0.25),
        "columns(0.25)": ap.Columns(0.25),
        "filters&columns": ap.Filters(0.5) & ap.Columns(0.5),
    }.items():
        admm = ap.ADMM(model, {nn.Linear: c}, rho=1e-3)
        admm.update()  # warm-up
        ts = []
        for _ in range(repeats):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p), alpha=1e-3)  # a W-step happened
            t0 = time.perf_counter()
            admm.update()
            ts.append(time.perf_counter() - t0)
        out[label] = statistics.median(ts)
        del admm
    return out


def ssauto_update_times(repeats: int, couple: bool | None = None, SSAuto=None) -> dict[str, float]:
    """Seconds of one SS-Auto ``update()`` on CIFAR ResNet-20 (its 18 block convs, by MACs,
    ``min_keep=0.3``, target 0.5): the first (λ searched from scratch) and the median of the
    next ``repeats`` (weights moved between them); and one hard ADMM update for scale.
    ``couple=None`` leaves the keyword out (versions before it); ``SSAuto``: the class to time
    (default: this checkout's)."""
    from admmprune.models import build_model

    if SSAuto is None:
        from admmprune.solvers.ssauto import SSAuto

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=3, input_size=32)
    x = torch.randn(1, 3, 32, 32)
    kw = {} if couple is None else {"couple": couple}
    s = SSAuto(model, ["layer*.conv*"], target=0.5, by="macs", example_input=x, min_keep=0.3, **kw)
    t0 = time.perf_counter()
    s.update()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-2)
        t0 = time.perf_counter()
        s.update()
        ts.append(time.perf_counter() - t0)
    admm = ap.ADMM(model, {"layer*.conv*": ap.Filters(0.71) & ap.Columns(0.71)})
    t0 = time.perf_counter()
    admm.update()
    return {"first": first, "next": statistics.median(ts), "admm": time.perf_counter() - t0}


# the modules an SSAuto from before the package's layers (src/admmprune/proximal.py) imports,
# by their old flat names: aliased to this checkout's, so an old revision still loads
_FLAT_NAMES = {
    "admm": "solvers.admm",
    "constraints": "sets.constraints",
    "masks": "weights.masks",
    "select": "weights.select",
    "accounting": "weights.count",
    "groups": "structure.groups",
}


def _git_show(root: Path, rev: str, path: str) -> str | None:
    import subprocess

    out = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


def _module_from(src: str, name: str, package: str, origin: str):
    import sys
    import types

    module = types.ModuleType(name)
    module.__package__ = package
    sys.modules[name] = module  # dataclasses look their module up there
    exec(compile(src, origin, "exec"), module.__dict__)
    return module


def proximal_at(rev: str):
    """SSAuto's module as it is at git revision ``rev`` (``solvers/ssauto.py`` with its
    ``ssauto_rates.py``, or the flat ``proximal.py`` of revisions before the layers), loaded
    beside this checkout's; its other imports resolve to this checkout's modules."""
    import importlib
    import sys

    root = Path(__file__).resolve().parents[1]
    src = _git_show(root, rev, "src/admmprune/solvers/ssauto.py")
    if src is None:  # before the layers: relative imports by flat names
        for old, new in _FLAT_NAMES.items():
            sys.modules.setdefault(f"admmprune.{old}", importlib.import_module(f"admmprune.{new}"))
        src = _git_show(root, rev, "src/admmprune/proximal.py")
        if src is None:
            raise ValueError(f"revision {rev!r} has no SSAuto")
        return _module_from(src, "admmprune._proximal_at_rev", "admmprune", f"{rev}:proximal.py")
    rates_name = "admmprune.solvers.ssauto_rates"
    ours = importlib.import_module(rates_name)
    rates = _git_show(root, rev, "src/admmprune/solvers/ssauto_rates.py")
    try:  # the revision's own λ search, seen by its ssauto.py under the usual name
        if rates is not None:
            sys.modules[rates_name] = _module_from(
                rates, rates_name, "admmprune.solvers", f"{rev}:ssauto_rates.py"
            )
        return _module_from(
            src, "admmprune.solvers._ssauto_at_rev", "admmprune.solvers", f"{rev}:ssauto.py"
        )
    finally:
        sys.modules[rates_name] = ours


def ssauto_paired(rev: str, rounds: int, repeats: int) -> dict:
    """``ssauto_update_times`` of this checkout and of ``rev``, alternated ``rounds`` times
    (the order flipping each round): the medians of each and their ratio."""
    from admmprune.solvers.ssauto import SSAuto

    classes = {"this": SSAuto, rev: proximal_at(rev).SSAuto}
    out = {}
    for couple in (False, True):
        runs = {k: [] for k in classes}
        for r in range(rounds):
            for k in list(classes)[:: 1 if r % 2 == 0 else -1]:
                runs[k].append(ssauto_update_times(repeats, couple, classes[k]))
        med = {
            k: {f: statistics.median(x[f] for x in v) for f in ("first", "next")}
            for k, v in runs.items()
        }
        out[f"couple={couple}"] = {**med, "next_ratio": med["this"]["next"] / med[rev]["next"]}
    return out


def main() -> None:
    ap_ = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap_.add_argument("--batch", type=int, default=32)
    ap_.add_argument("--rounds", type=int, default=40)
    ap_.add_argument("--big", type=int, default=100, help="millions of constrained parameters")
    ap_.add_argument("--repeats", type=int, default=3)
    ap_.add_argument("--seed", type=int, default=0)
    ap_.add_argument("--out", default="benchmarks/results/overhead.json")
    ap_.add_argument(
        "--ssauto-against", metavar="REV",
        help="only part 3, this checkout's SSAuto against the one at git revision REV, paired",
    )  # fmt: skip
    args = ap_.parse_args()
    if args.ssauto_against:
        rev = args.ssauto_against
        res = ssauto_paired(rev, 3, args.repeats)
        print(f"SSAuto.update() on ResNet-20, this checkout vs {rev}, seconds (3 paired rounds)")
        print(
            "| couple | first: this / rev | next: this / rev | next ratio |\n|---|---:|---:|---:|"
        )
        for c, r in res.items():
            this, ref = r["this"], r[rev]
            print(f"| {c} | {this['first']:.2f} / {ref['first']:.2f} | "
                  f"{this['next']:.2f} / {ref['next']:.2f} | {r['next_ratio']:.2f} |")  # fmt: skip
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"against": rev, "ssauto_update_s": res}, indent=2))
        print(f"\nwrote {out}")
        return

    times = step_times(args.batch, args.rounds, args.seed)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    # Paired: the ratio to plain within each round, then the median over rounds.
    ratio = {
        v: statistics.median(t / p for t, p in zip(ts, times["plain"])) - 1
        for v, ts in times.items()
    }
    print(
        f"\nResNet-18 training step, batch {args.batch} @ 32x32, CPU, "
        f"{torch.get_num_threads()} threads, median of {args.rounds}"
    )
    print("| variant | ms/step | overhead vs plain (median of paired ratios) |\n|---|---:|---:|")
    for v, m in med.items():
        print(f"| {v} | {m * 1e3:.1f} | {ratio[v]:+.1%} |")

    upd = update_times(args.big, args.repeats)
    print(f"\nOne ADMM.update() on {upd['constrained_params'] / 1e6:.0f} M constrained parameters")
    print("| constraint | seconds |\n|---|---:|")
    for k, v in upd.items():
        if k != "constrained_params":
            print(f"| {k} | {v:.2f} |")

    ss = {c: ssauto_update_times(args.repeats, couple=c) for c in (False, True)}
    print("\nOne SSAuto.update() on ResNet-20 (18 block convs, by MACs, min_keep 0.3), seconds")
    print("| couple | first | next (median) | hard ADMM update |\n|---|---:|---:|---:|")
    for c, r in ss.items():
        print(f"| {c} | {r['first']:.2f} | {r['next']:.2f} | {r['admm']:.3f} |")

    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "step": {
            "batch": args.batch,
            "rounds": args.rounds,
            "median_s": med,
            "overhead_paired_median": ratio,
        },
        "update": upd,
        "ssauto_update_s": {f"couple={c}": r for c, r in ss.items()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
