"""Does structure finding work on the user's model? A sweep as a new user would try it.

Each case runs in a child process under a time limit (a hang is a result, not a stall):

- torchvision: every classification model under 100 M parameters and the Faster R-CNN /
  RetinaNet / SSDlite detectors, random weights (BatchNorm statistics randomised so outputs
  depend on every channel): ``channel_groups(keep=0.5)`` → ADMM's projection (``prune``) →
  ``compact``, then the compact model against the masked one on another input;
- Hugging Face: tiny configs of the transformer families of ``tests/test_hf_families.py`` and
  the MoE families of ``tests/test_experts.py``: ``head_groups`` + ``channel_groups`` →
  prune → ``compact`` (exact / refused), and one-shot 50 % coverage of the blocks' GEMM
  weights.

Statuses: ``exact`` (compact equals masked, max |Δ| ≤ 1e-4 of max |y|), ``refused`` (a
clear ValueError naming the reason), ``crash`` (any other exception), ``timeout``. Prints a
table and writes ``OUT/model_zoo.json``.

    python benchmarks/model_zoo.py --out benchmarks/results            # everything (~30 min)
    python benchmarks/model_zoo.py --torchvision resnet18 --hf GPTNeoX Mixtral
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUTERS = ("gate.weight", "router.weight", "shared_expert_gate.weight")  # they score experts
DETECTORS = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
)


def _torchvision_names(limit: float = 100e6) -> list[str]:
    import torchvision
    from torchvision.models import get_model_weights, list_models

    out = []
    for name in list_models(module=torchvision.models):
        try:
            params = get_model_weights(name).DEFAULT.meta["num_params"]
        except Exception:  # no weights entry: build it to count
            params = 0
        if params < limit:
            out.append(name)
    return sorted(out)


def _hf_families() -> dict[str, tuple]:
    sys.path.insert(0, str(ROOT / "tests"))
    import test_experts
    import test_hf_families

    out = {k: v for k, v in test_hf_families.FAMILIES.items()}
    out |= {k: (*v[:3],) for k, v in test_hf_families.REFUSED.items()}
    for name, kw in test_experts.FAMILIES.items():
        out[name] = (f"{name}Config", f"{name}ForCausalLM", {**test_experts._COMMON, **kw})
    return out


def _randomize_bn(model) -> None:
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _max_rel(a, b) -> float:
    import torch

    from admmprune.weights.forward import floats

    worst = 0.0
    for x, y in zip(floats(a), floats(b), strict=True):
        if x.shape != y.shape:
            return float("inf")
        if y.numel():
            scale = max(float(y.abs().max()), 1e-12)
            worst = max(worst, float((x - y).abs().max()) / scale)
    return worst if torch.isfinite(torch.tensor(worst)) else float("inf")


def _output_layers_rel(model, small, x, y) -> float:
    """The largest relative difference between the two models' output layers on ``y``."""
    import torch

    from admmprune.structure.graph import output_layers
    from admmprune.weights.forward import call

    names = {m: n for n, m in model.named_modules()}
    layers = [names[m] for m in output_layers(model, x)]
    seen = {}
    for which, net in (("masked", model), ("small", small)):
        modules = dict(net.named_modules())
        hooks = [modules[n].register_forward_hook(
            lambda _m, _a, o, n=n, w=which: seen.setdefault((w, n), []).append(o.detach()))
            for n in layers]  # fmt: skip
        with torch.no_grad():
            call(net, y)
        for h in hooks:
            h.remove()
    return max(
        _max_rel(b, a)
        for n in layers
        for a, b in zip(seen[("masked", n)], seen[("small", n)], strict=True)
    )


def _structured(model, x, y, heads: bool) -> dict:
    import torch

    import admmprune as ap
    from admmprune.weights.forward import call

    tic = time.perf_counter()
    groups = []
    if heads:
        try:
            groups += ap.head_groups(model, keep=0.5)
        except ValueError as e:
            head_refusal = str(e).splitlines()[1:2]
        else:
            head_refusal = []
    try:
        groups += ap.channel_groups(model, x, keep=0.5)
    except ValueError as e:
        if not groups:
            return {"status": "refused", "reason": str(e)[:300],
                    "structure_seconds": time.perf_counter() - tic}  # fmt: skip
    finding = time.perf_counter() - tic
    ap.ADMM(model, {}, groups=groups, rho=1e-2).prune()
    tic = time.perf_counter()
    small, report = ap.compact(model, x)
    # the bound is on structure finding + compaction, not imports or the model build
    structure_seconds = finding + time.perf_counter() - tic
    with torch.no_grad():
        rel = _max_rel(call(small, y), call(model, y))
    # a detector's NMS / sorting turns rounding into other detections: what is comparable is
    # what its output layers (kept whole by compact) compute before the post-processing
    heads_rel = _output_layers_rel(model, small, x, y)
    out = {
        "status": "exact" if rel <= 1e-4 or heads_rel <= 1e-4 else "wrong",
        "max_rel_output_layers": heads_rel,
        "groups": len(groups),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "max_rel": rel,
        "skipped": len(report.skipped),
        "structure_seconds": structure_seconds,
    }
    if heads and head_refusal:
        out["heads_refused"] = head_refusal[0].strip()[:200]
    return out


def _one(kind: str, name: str) -> dict:
    import torch

    torch.manual_seed(0)
    if kind == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, weights=None).eval()
        _randomize_bn(model)
        size = 299 if name == "inception_v3" else 224
        x, y = torch.randn(1, 3, size, size), torch.randn(2, 3, size, size)
        return _structured(model, x, y, heads=True)
    if kind == "detector":
        import torchvision

        model = torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
        _randomize_bn(model)
        x, y = [torch.rand(3, 320, 320)], [torch.rand(3, 320, 320)]
        return _structured(model, x, y, heads=False)
    import transformers as tf

    import admmprune as ap

    cfg_name, model_name, kwargs = _hf_families()[name]  # puts tests/ on the path
    from tiny_models import reinit

    model = reinit(getattr(tf, model_name)(getattr(tf, cfg_name)(**kwargs)))
    ids = lambda b, s: torch.randint(3, 64, (b, 8), generator=torch.Generator().manual_seed(s))  # noqa: E731
    x, y = {"input_ids": ids(1, 0)}, {"input_ids": ids(2, 1)}
    if model.config.is_encoder_decoder:
        x["decoder_input_ids"], y["decoder_input_ids"] = ids(1, 2)[:, :5], ids(2, 3)[:, :5]
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    cal = [{k: v for k, v in y.items()} for _ in range(2)]
    masks = ap.oneshot(model, ap.Unstructured(0.5), cal, solver="sparsegpt")
    lists = masks.report.block_lists
    gemm = {n: p for n, p in model.named_parameters()
            if any(n.startswith(f"{b}.") for b in lists) and p.ndim >= 2 and "bias" not in n
            and not n.endswith(ROUTERS)}  # fmt: skip
    covered = sum(p.numel() for n, p in gemm.items() if n in masks) / sum(
        p.numel() for p in gemm.values()
    )
    model.load_state_dict(dense)
    out = _structured(model, x, y, heads=True)
    out["oneshot_coverage"] = covered
    out["block_lists"] = lists
    return out


def _run_case(kind: str, name: str, timeout: float) -> dict:
    tic = time.perf_counter()
    cmd = [sys.executable, __file__, "--one", kind, name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"kind": kind, "name": name, "status": "timeout", "seconds": timeout}
    seconds = time.perf_counter() - tic
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {
            "kind": kind,
            "name": name,
            "status": "crash",
            "reason": tail[:300],
            "seconds": seconds,
        }
    return {"kind": kind, "name": name, **json.loads(lines[-1]), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torchvision", nargs="*", default=None, help="names (default: all < 100 M)")
    ap.add_argument("--detectors", nargs="*", default=None)
    ap.add_argument("--hf", nargs="*", default=None, help="family names (default: all)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per case")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "NAME"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        try:
            result = _one(*args.one)
        except ValueError as e:  # a refusal names its reason
            result = {"status": "refused", "reason": str(e)[:300]}
        print(json.dumps(result))
        return
    picked = any(v is not None for v in (args.torchvision, args.detectors, args.hf))
    cases = []
    if args.torchvision is not None or not picked:
        cases += [("torchvision", n) for n in (args.torchvision or _torchvision_names())]
    if args.detectors is not None or not picked:
        cases += [("detector", n) for n in (args.detectors or DETECTORS)]
    if args.hf is not None or not picked:
        cases += [("hf", n) for n in (args.hf or list(_hf_families()))]
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'kind':<12} {'model':<40} {'status':<8} {'s':>6} {'struct':>6}  detail")
    for kind, name in cases:
        r = _run_case(kind, name, args.timeout)
        rows.append(r)
        detail = r.get("reason", "")[:70] or (
            f"params {r.get('params_before', 0):,} → {r.get('params_after', 0):,}"
            + (
                f", one-shot coverage {r['oneshot_coverage']:.3f}"
                if "oneshot_coverage" in r
                else ""
            )
        )
        struct = f"{r['structure_seconds']:6.1f}" if "structure_seconds" in r else f"{'-':>6}"
        print(f"{kind:<12} {name:<40} {r['status']:<8} {r['seconds']:>6.1f} {struct}  {detail}",
              flush=True)  # fmt: skip
        # written after every case: a sweep cut short keeps what it measured
        (out / "model_zoo.json").write_text(json.dumps({"cases": rows}, indent=1))
    counts = {
        s: sum(r["status"] == s for r in rows)
        for s in ("exact", "refused", "wrong", "crash", "timeout")
    }
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    (out / "model_zoo.json").write_text(json.dumps({"counts": counts, "cases": rows}, indent=1))


if __name__ == "__main__":
    main()
