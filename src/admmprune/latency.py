"""Measured inference time: warm-up, then the median of repeated timed runs.

On CUDA every run is bracketed by synchronisation; on CPU the thread count in use is reported
with the result, since it changes the answer more than anything else.

``channels_last=True`` times copies of the models and the input in the NHWC memory format,
the one oneDNN's CPU convolutions run fastest in; it matters most for thin layers, i.e. for
pruned models (ResNet-20 compacted to 1/4 of its MACs, batch 64, 2 threads: 0.63 of the MAC
reduction in NCHW, 0.86–0.92 in NHWC; benchmarks/README.md).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

__all__ = ["measure", "measure_paired"]


def _nhwc(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """Copies of ``model`` and ``x`` in channels-last format (``x`` must be 4-D)."""
    if x.ndim != 4:
        raise ValueError(f"channels_last needs a 4-D input (N, C, H, W), got {tuple(x.shape)}.")
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    return fast, x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def measure(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    warmup: int = 5,
    repeats: int = 20,
    channels_last: bool = False,
) -> dict:
    """Median, 10th and 90th percentile milliseconds of ``model(example_input)`` in eval mode."""
    if channels_last:
        model, example_input = _nhwc(model, example_input)
    was_training = model.training
    model.eval()
    cuda = example_input.is_cuda

    def once() -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(example_input)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    try:
        for _ in range(warmup):
            once()
        times = sorted(once() * 1e3 for _ in range(repeats))
    finally:
        model.train(was_training)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {
        "median_ms": statistics.median(times),
        "p10_ms": q[0],
        "p90_ms": q[-1],
        "repeats": repeats,
        "batch": example_input.shape[0],
        "device": str(example_input.device),
        "threads": torch.get_num_threads(),
        "channels_last": channels_last,
    }


@torch.no_grad()
def measure_paired(
    models: dict[str, nn.Module],
    example_input: torch.Tensor,
    rounds: int = 20,
    *,
    channels_last: bool = False,
) -> dict[str, float]:
    """Median milliseconds of each model, timed in alternation (the order rotates every round)
    so that the machine's noise hits all of them alike: compare ratios, not absolute times."""
    if channels_last:
        converted = {n: _nhwc(m, example_input) for n, m in models.items()}
        models = {n: m for n, (m, _) in converted.items()}
        example_input = next(iter(converted.values()))[1]
    for m in models.values():
        m.eval()
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    cuda = example_input.is_cuda
    for _ in range(3):
        for n in names:
            models[n](example_input)
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            models[n](example_input)
            if cuda:
                torch.cuda.synchronize()
            times[n].append((time.perf_counter() - t0) * 1e3)
    return {n: statistics.median(t) for n, t in times.items()}
