"""Measured inference time: warm-up, then the median of repeated timed runs.

On CUDA every run is bracketed by synchronisation; on CPU the thread count in use is reported
with the result, since it changes the answer more than anything else.

Both functions can time the models in the form they would be deployed in
(:func:`inference_form`, on copies; the models passed in are not changed):

- ``fold_bn=True``: every BatchNorm that directly follows a conv is folded into the conv's
  weight and bias (``torch.fx``'s eval-mode fusion), so it costs nothing at inference;
- ``channels_last=True``: weights and input in NHWC, the layout oneDNN's CPU convolutions run
  fastest in.

Both matter most for thin layers, i.e. for pruned models: ResNet-20 compacted to 1/4 of its
MACs, batch 64, 2 threads, is 0.67 of the MAC reduction faster in plain NCHW, 0.78 in NHWC and
1.06 with BN folded as well (benchmarks/README.md) — BN, ReLU and the residual additions scale
with the channels, not with the MACs, so unfused they eat into the gain.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

__all__ = ["inference_form", "measure", "measure_paired"]


@torch.no_grad()
def inference_form(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    fold_bn: bool = False,
    channels_last: bool = False,
) -> tuple[nn.Module, torch.Tensor]:
    """A copy of ``model`` in eval mode as it would be deployed, and the input to match it.

    Raises ``ValueError`` when ``channels_last`` gets an input that is not 4-D, or when
    ``fold_bn`` meets a model ``torch.fx`` cannot trace (then time it with ``fold_bn=False``).
    """
    x = example_input
    if channels_last and x.ndim != 4:
        raise ValueError(f"channels_last needs a 4-D input (N, C, H, W), got {tuple(x.shape)}.")
    form = copy.deepcopy(model).eval()
    if fold_bn:
        from torch.fx.experimental.optimization import fuse

        try:
            form = fuse(form)
        except Exception as exc:  # fx raises many kinds on untraceable code
            raise ValueError(
                f"fold_bn: torch.fx cannot trace {type(model).__name__} ({exc}); "
                "time it with fold_bn=False."
            ) from None
    if channels_last:
        form = form.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return form, x


def _once(model: nn.Module, x: torch.Tensor) -> float:
    """Milliseconds of one ``model(x)``, the GPU synchronised on both sides."""
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def measure(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    warmup: int = 5,
    repeats: int = 20,
    fold_bn: bool = False,
    channels_last: bool = False,
) -> dict:
    """Median, 10th and 90th percentile milliseconds of ``model(example_input)`` in eval mode
    (of its :func:`inference_form` when ``fold_bn`` or ``channels_last``)."""
    if fold_bn or channels_last:
        model, example_input = inference_form(
            model, example_input, fold_bn=fold_bn, channels_last=channels_last
        )
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            _once(model, example_input)
        times = sorted(_once(model, example_input) for _ in range(repeats))
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
        "fold_bn": fold_bn,
        "channels_last": channels_last,
    }


@torch.no_grad()
def measure_paired(
    models: dict[str, nn.Module],
    example_input: torch.Tensor,
    rounds: int = 20,
    *,
    fold_bn: bool = False,
    channels_last: bool = False,
) -> dict[str, float]:
    """Median milliseconds of each model, timed in alternation (the order rotates every round)
    so that the machine's noise hits all of them alike: compare ratios, not absolute times.
    ``fold_bn`` / ``channels_last``: time their :func:`inference_form` instead."""
    if fold_bn or channels_last:
        forms = {
            n: inference_form(m, example_input, fold_bn=fold_bn, channels_last=channels_last)
            for n, m in models.items()
        }
        models = {n: m for n, (m, _) in forms.items()}
        example_input = next(iter(forms.values()))[1]
    modes = {n: m.training for n, m in models.items()}
    for m in models.values():
        m.eval()
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    try:
        for _ in range(3):
            for n in names:
                models[n](example_input)
        for r in range(rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                times[n].append(_once(models[n], example_input))
    finally:
        for n, m in models.items():
            m.train(modes[n])  # the caller's models come back as they were given
    return {n: statistics.median(t) for n, t in times.items()}
