"""Serving a pruned model: its fastest measured form on the batch it will serve.

:func:`deploy` copies the model (eval mode) and applies, in order:

1. BatchNorm folded into the convs before it (``torch.fx``; skipped, and said so, where the
   model cannot be traced);
2. NHWC weights and input for 4-D inputs (oneDNN's and cuDNN's fast layout);
3. zero columns of convs as the :class:`admmprune.deployment.sparse.ColumnConv2d` form that
   :func:`admmprune.deployment.sparse.to_columns` measures fastest per layer (dense where none is);
4. the fastest of eager and ``torch.compile`` (mode ``"default"``; on CUDA also
   ``"reduce-overhead"``, which replays CUDA graphs, the cure for launch-bound small models),
   timed side by side on ``example`` (:func:`admmprune.deployment.latency.measure_paired`). A
   compiled form is kept only when it is more than 5 % faster than eager; one that fails to
   compile, or whose outputs differ, is skipped and the reason reported.

A language model (``generate``; ``example`` its token ids) gets its pruned Linears on the CPU
decode kernel where it is faster (:func:`admmprune.deployment.decode.to_sparse_decode`, paired
timing per layer on the example's batch); ``Deployed.generate`` generates with it.

The result computes what the model computes: every candidate is checked on ``example``
(``max|Δ| <= tol · max|y|``, ``tol`` by dtype from :data:`admmprune.structure.compact.TOLERANCE`, as
:func:`admmprune.compact` checks: 1e-4 in fp32).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..structure.compact import TOLERANCE
from .latency import inference_form, measure_paired

__all__ = ["DeployReport", "Deployed", "deploy"]

_BETTER = 0.95  # a compiled form must take under 95 % of eager's time


@dataclass
class DeployReport:
    """What :func:`deploy` did: the steps applied, the form chosen and every candidate's
    median milliseconds on the example, and what was skipped and why."""

    steps: list[str] = field(default_factory=list)
    choice: str = "eager"
    timings_ms: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


class Deployed(nn.Module):
    """The deployed form of a model; ``forward`` takes the model's own input (NCHW is turned
    into NHWC here when the form runs NHWC). ``report`` says how it was made."""

    def __init__(self, module: nn.Module, channels_last: bool, report: DeployReport) -> None:
        super().__init__()
        self.module, self.channels_last, self.report = module, channels_last, report

    def forward(self, x: torch.Tensor, **kwargs):
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.module(x, **kwargs)

    def generate(self, *args, **kwargs):
        """A language model's ``generate`` (deployed LMs)."""
        return self.module.generate(*args, **kwargs)


def _outputs_agree(y: torch.Tensor, ref: torch.Tensor) -> bool:
    scale = float(ref.abs().max()) or 1.0
    tol = TOLERANCE.get(ref.dtype, 1e-4)
    return y.shape == ref.shape and float((y - ref).abs().max()) <= tol * scale


@torch.no_grad()
def deploy(
    model: nn.Module, example: torch.Tensor, *, compile: bool = True, rounds: int = 10
) -> Deployed:
    """The fastest measured form of ``model`` for batches like ``example`` (its batch size,
    dtype, device); see the module docstring for the steps. ``compile=False`` keeps eager.
    The model passed in is not changed."""
    if not torch.is_tensor(example):
        raise TypeError(
            f"deploy(model, example): example must be an input batch (a tensor), got "
            f"{type(example).__name__}."
        )
    from .sparse import ColumnConv2d, to_columns

    report = DeployReport()
    if hasattr(model, "generate") and not example.is_floating_point():
        return _deploy_lm(model, example, report, rounds)
    was_training = model.training
    try:
        ref = model.eval()(example)  # what every form must reproduce
    finally:
        model.train(was_training)
    if not torch.is_tensor(ref):
        raise TypeError(
            f"deploy: {type(model).__name__} returns {type(ref).__name__}; deploy serves models "
            "that return one tensor."
        )
    nhwc = example.ndim == 4
    try:
        form, x = inference_form(model, example, fold_bn=True, channels_last=nhwc)
        report.steps.append("fold_bn")
    except ValueError as exc:  # untraceable: keep the BatchNorms
        report.skipped["fold_bn"] = str(exc)
        form, x = inference_form(model, example, channels_last=nhwc)
    if nhwc:
        report.steps.append("channels_last")
    form = to_columns(form, x)
    if any(isinstance(m, ColumnConv2d) for m in form.modules()):
        report.steps.append("to_columns")
    if not _outputs_agree(form(x), ref):
        raise RuntimeError(
            "deploy: the folded / NHWC / column form of the model computes something else on "
            "the example (a bug: please report it with the model)."
        )
    candidates: dict[str, nn.Module] = {"eager": form}
    if compile:
        modes = ["default"] + (["reduce-overhead"] if x.is_cuda else [])
        for mode in modes:
            name = f"compile:{mode}"
            try:
                compiled = torch.compile(copy.deepcopy(form), mode=mode)
                ok = _outputs_agree(compiled(x), ref)  # the first call compiles
            except Exception as exc:  # a backend can fail in many ways; eager still serves
                report.skipped[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            if ok:
                candidates[name] = compiled
            else:
                report.skipped[name] = "its outputs differ from the model's"
    if len(candidates) > 1:
        report.timings_ms = measure_paired(candidates, x, rounds)
        best = min(report.timings_ms, key=report.timings_ms.get)
        if report.timings_ms[best] < _BETTER * report.timings_ms["eager"]:
            report.choice = best
    report.steps.append(report.choice)
    return Deployed(candidates[report.choice], nhwc, report)


def _deploy_lm(model: nn.Module, ids: torch.Tensor, report: DeployReport, rounds: int) -> Deployed:
    """A language model (``ids``: token ids, its batch the serving batch): a copy with each
    pruned Linear on the CPU decode kernel where it measures faster
    (:func:`admmprune.deployment.decode.to_sparse_decode`)."""
    from .decode import to_sparse_decode

    form = copy.deepcopy(model).eval()
    decoded = to_sparse_decode(form, batch=ids.shape[0], rounds=max(rounds, 5))
    report.steps.append("sparse_decode")
    for name, (dense_ms, sparse_ms) in decoded.timings_ms.items():
        report.timings_ms |= {f"{name}:dense": dense_ms, f"{name}:sparse": sparse_ms}
    report.skipped.update(decoded.skipped)
    report.choice = f"sparse_decode: {len(decoded.sparse)} layers"
    return Deployed(form, False, report)
