"""Low-precision ADMM state (``ADMM(state_dtype=...)``): how far its masks are from fp32 state's.

Two toy problems, each trained the same way with every state dtype:

- ``random``: an MLP on random data (Unstructured 20 % on the first layer, 2:4 on the second),
  a problem with many near-ties, where the mask depends on small perturbations;
- ``planted``: two linear layers fitted to sparse teachers (20 % unstructured, 2:4), whose
  answer (the teachers' supports) does not hang on rounding.

Reported per layer: the share of fp32 state's kept weights that the other run did not keep,
for bf16 and float8 state and, as a yardstick, for fp32 state on initial weights perturbed by
0.4 % (bf16's rounding); the state's bytes per constrained weight.

    python benchmarks/admm_state.py [--out benchmarks/results/admm_state.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import admmprune as ap

DTYPES = ("float32", "bfloat16", "float8")


def random_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    x = torch.randn(256, 32)
    y = (x @ torch.randn(32, 16)).argmax(1)
    loss = lambda out, t: nn.functional.cross_entropy(out, t)  # noqa: E731
    return model, {"0": ap.Unstructured(0.2), "2": ap.NM(2, 4)}, x, y, loss


class _TwoRegressions(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 24, bias=False), nn.Linear(32, 16, bias=False)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


def planted_problem():
    g = torch.Generator().manual_seed(0)
    Wa = ap.Unstructured(0.2).project(torch.randn(24, 32, generator=g))[0]
    Wb = ap.NM(2, 4).project(torch.randn(16, 32, generator=g))[0]
    x = torch.randn(512, 32, generator=g)
    y = torch.cat([x @ Wa.T, x @ Wb.T], dim=1)
    torch.manual_seed(1)
    loss = lambda out, t: (out - t).square().mean()  # noqa: E731
    return _TwoRegressions(), {"a": ap.Unstructured(0.2), "b": ap.NM(2, 4)}, x, y, loss


def run(problem, dtype: str, perturb: float = 0.0, steps: int = 300) -> tuple[dict, float, float]:
    model, spec, x, y, loss_fn = problem()
    if perturb:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + perturb * torch.randn(p.shape, generator=g))
    admm = ap.ADMM(model, spec, rho=0.05, rho_growth=1.3, state_dtype=dtype)
    per_weight = admm.state_bytes() / sum(t.param.numel() for t in admm.targets)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for s in range(steps):
        i = torch.arange(s * 64, s * 64 + 64) % len(x)
        loss = loss_fn(model(x[i]), y[i])
        opt.zero_grad()
        (loss + admm.penalty()).backward()
        opt.step()
        if (s + 1) % 20 == 0:
            admm.update()
    masks = admm.prune()
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    return dict(masks), final, per_weight


def main() -> None:
    ap_ = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap_.add_argument("--out", default="benchmarks/results/admm_state.json")
    ap_.add_argument("--steps", type=int, default=300, help="training steps per run")
    args = ap_.parse_args()
    torch.set_num_threads(2)
    rows = []
    for name, problem in (("random", random_problem), ("planted", planted_problem)):
        ref, ref_loss, _ = run(problem, "float32", steps=args.steps)
        runs = {d: run(problem, d, steps=args.steps) for d in DTYPES[1:]}
        runs["float32, weights ×(1 ± 0.4 %)"] = run(problem, "float32", 4e-3, args.steps)
        for label, (masks, final, per_weight) in runs.items():
            differ = {n: float((ref[n] & ~masks[n]).sum()) / float(ref[n].sum()) for n in ref}
            rows.append(
                {"problem": name, "state": label, "bytes_per_weight": per_weight,
                 "kept_not_in_fp32_masks": differ, "loss": final, "loss_fp32": ref_loss}
            )  # fmt: skip
    print(f"{'problem':<8} {'state':<30} {'B/weight':>8}  {'masks differ (per layer)':<26} loss")
    for r in rows:
        d = ", ".join(f"{v:.1%}" for v in r["kept_not_in_fp32_masks"].values())
        print(f"{r['problem']:<8} {r['state']:<30} {r['bytes_per_weight']:>8.2f}  {d:<26} "
              f"{r['loss']:.4f} (fp32 {r['loss_fp32']:.4f})")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch_threads": 2, "steps": args.steps, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
