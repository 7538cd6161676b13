"""Measured inference time: warm-up, then the median of repeated timed runs.

On CUDA every run is bracketed by synchronisation; on CPU the thread count in use is reported
with the result, since it changes the answer more than anything else.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

__all__ = ["measure"]


@torch.no_grad()
def measure(
    model: nn.Module, example_input: torch.Tensor, *, warmup: int = 5, repeats: int = 20
) -> dict:
    """Median, 10th and 90th percentile milliseconds of ``model(example_input)`` in eval mode."""
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
    }
