"""Physically smaller models from structured sparsity (StructADMM's speedups are measured here).

Channels are coupled: a conv's output channel feeds its BatchNorm, the ReLU, a residual addition
shared with other convs, a concatenation, and the input slices of every consumer. Torch-Pruning's
``DependencyGraph`` (pinned; used only through this module) traces the model and returns those
coupled sets as groups.

A channel of a group is *removable* when every producer of it carries exactly zero: the output
rows of each Conv/Linear (weights and bias) and the affine weight and bias of each norm layer.
Then the channel is identically 0 after every element-wise op (zero padding keeps it 0), the
consumers' input slices for it contribute nothing, and removing the whole group slice leaves the
network's function unchanged. Channels zeroed in some producers but not all cannot be removed;
:func:`compact` counts them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..weights.count import count
from ..weights.forward import call, no_cache
from ..weights.forward import floats as _tensors
from ..weights.gemm import _LAYERS, is_conv1d
from . import heads
from .expert_neurons import neuron_maps, remove_zero_neurons, zero_dead_neurons
from .graph import GraphError, analyse, output_layers

__all__ = ["CompactReport", "CompactionError", "compact", "zero_dead_inputs"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


class CompactionError(ValueError):
    """:func:`compact` could not build a smaller model with the same outputs; the message names
    the layer (nothing is returned, so no wrong model can be used). ``where``: the first module
    whose output diverged, :data:`AFTER_MODULES` when every module agreed and only the code after
    them (post-processing) did not, or None."""

    where: str | None = None


#: where a divergence is when every module's output agreed: in code after the modules
AFTER_MODULES = "the model's output"


#: the largest max|Δ| / max|y| the check accepts between the compact and the masked model
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _second_input(x):
    """A random input shaped like ``x`` (seeded; a dict: each tensor): values in the example's
    range."""
    if isinstance(x, dict):
        return {k: _second_input(v) if torch.is_tensor(v) else v for k, v in x.items()}
    if isinstance(x, (list, tuple)):  # a detector's list of images
        return type(x)(_second_input(v) if torch.is_tensor(v) else v for v in x)
    g = torch.Generator().manual_seed(1234)
    if x.is_floating_point():
        scale = float(x.float().std()) if x.numel() > 1 else 1.0
        r = torch.randn(x.shape, generator=g) * (scale or 1.0) + float(x.float().mean())
        return r.to(device=x.device, dtype=x.dtype)
    hi = int(x.max()) + 1 if x.numel() else 1
    return torch.randint(0, max(hi, 1), x.shape, generator=g).to(device=x.device, dtype=x.dtype)


class _Trace:
    """Per-module output fingerprints over one forward: shape, norm and a seeded random
    projection ``<y, r>`` (|Δ⟨y, r⟩| ≈ ||Δy||), so modules can be compared without keeping
    their outputs; and the innermost module running when a forward fails."""

    def __init__(self, model: nn.Module, probes: dict[int, torch.Tensor]) -> None:
        # probes: the random vector per output size, shared by every trace of one compact()
        # (drawing it per module was a fifth of a detector's compaction)
        self.model, self.prints, self.stack, self.probes = model, [], [], probes

    def _pre(self, name):
        def hook(module, args):
            self.stack.append(name)

        return hook

    def _post(self, name):
        def hook(module, args, out):
            self.stack.pop()
            ts = _tensors(out)
            if ts:
                y = ts[0].detach().float().flatten()
                r = self.probes.get(y.numel())
                if r is None:
                    g = torch.Generator().manual_seed(y.numel())
                    r = self.probes[y.numel()] = torch.randn(y.numel(), generator=g)
                self.prints.append((name, tuple(ts[0].shape), float(y.norm()),
                                    float(y @ r.to(y.device))))  # fmt: skip

        return hook

    @torch.no_grad()
    def run(self, x) -> list[torch.Tensor]:
        handles = []
        for name, m in self.model.named_modules():
            if name:
                handles.append(m.register_forward_pre_hook(self._pre(name)))
                handles.append(m.register_forward_hook(self._post(name)))
        try:
            with no_cache(self.model):
                out = call(self.model, x)
            return [t.detach().clone() for t in _tensors(out)]
        finally:
            for h in handles:
                h.remove()


def _reference(model: nn.Module, inputs: list, probes: dict) -> list:
    out = []
    for x in inputs:
        trace = _Trace(model, probes)
        out.append((trace.run(x), trace.prints))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a − b| / max|b|``; two empty outputs (a detector that found nothing) agree."""
    if b.numel() == 0:
        return 0.0 if a.numel() == 0 else math.inf
    return float((a.float() - b.float()).abs().max()) / max(float(b.float().abs().max()), 1e-12)


def _verify(
    small: nn.Module, inputs: list, refs: list, tol: float, removed: dict, probes: dict
) -> None:
    """Raise :class:`CompactionError` unless the compact model reproduces the reference."""
    for which, (x, (ref_out, ref_prints)) in enumerate(zip(inputs, refs)):
        what = "the example input" if which == 0 else "a random input of the same shape"
        trace = _Trace(small, probes)
        try:
            out = trace.run(x)
        except Exception as e:
            where = trace.stack[-1] if trace.stack else type(small).__name__
            raise CompactionError(
                f"the compact model cannot run on {what}: {type(e).__name__} in {where!r}: {e}. "
                "The channels removed around that module are not consistent; leave its layers "
                "out of the structured constraints (or report the model)."
            ) from e
        bad = [
            i for i, (a, b) in enumerate(zip(out, ref_out))
            if a.shape != b.shape or _rel(a, b) > tol
        ]  # fmt: skip
        if not bad and len(out) == len(ref_out):
            continue
        where = _first_divergence(trace.prints, ref_prints, tol)
        error = CompactionError(
            f"the compact model's outputs differ from the masked model's on {what} "
            f"({_describe_gap(out, ref_out, bad)}; tolerance {tol:g} of the output scale), "
            f"first in {where!r}, after removing "
            f"channels of {', '.join(f'{k!r} ({v})' for k, v in removed.items()) or 'none'}. "
            "Nothing was returned: leave those layers out of the structured constraints (or "
            "report the model)."
        )
        error.where = where
        raise error


def _describe_gap(out, ref, bad) -> str:
    if len(out) != len(ref) or not bad:
        return f"{len(out)} output tensors instead of {len(ref)}"
    a, b = out[bad[0]], ref[bad[0]]
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} instead of {tuple(b.shape)}"
    return f"max |Δ| = {_rel(a, b):.3g} of max |y|"


def _first_divergence(prints, ref_prints, tol: float) -> str:
    """The first module, in the order modules finished, whose output kept its shape but not
    its values (channels removed inside a module change its shape legitimately)."""
    ref = {}
    for name, shape, norm, proj in ref_prints:
        ref.setdefault((name, shape), []).append((norm, proj))
    seen: dict = {}
    for name, shape, norm, proj in prints:
        k = seen[(name, shape)] = seen.get((name, shape), -1) + 1
        if (name, shape) not in ref or k >= len(ref[(name, shape)]):
            continue
        r_norm, r_proj = ref[(name, shape)][k]
        if abs(proj - r_proj) > 10 * tol * max(r_norm, 1e-12) or abs(
            norm - r_norm
        ) > 10 * tol * max(r_norm, 1e-12):
            return name
    return AFTER_MODULES


@dataclass
class CompactReport:
    """What :func:`compact` removed, and the zeroed channels it had to keep."""

    removed: dict[str, int] = field(default_factory=dict)  # root layer → channels removed
    # attention module → heads removed (key/value heads with grouped-query attention)
    heads_removed: dict[str, int] = field(default_factory=dict)
    not_removable: dict[str, int] = field(default_factory=dict)  # zero in some producers only
    # root layer → why its zero channels were kept whole (e.g. they cross a grouped conv)
    skipped: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0  # Conv/Linear MACs per sample of the example input's shape
    macs_after: int = 0
    sparse_macs_after: int = 0  # of those, with a non-zero weight (e.g. after column pruning)
    all_macs_before: int = 0  # every matrix product the forward runs (attention's included)
    all_macs_after: int = 0

    @property
    def mac_reduction(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    @property
    def total_not_removable(self) -> int:
        return sum(self.not_removable.values())


def _misfit(producers: list) -> str | None:
    """Why a traced group cannot be right: a producer given a channel index it does not have."""
    for m, idxs in producers:
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or not idxs:
            continue
        size = w.shape[1] if is_conv1d(m) else w.shape[0]
        if max(idxs) >= size:
            return (
                f"its traced channels do not fit {type(m).__name__} ({size} outputs, channel "
                f"{max(idxs)} asked for: a broadcast traced as a coupling)"
            )
    return None


@torch.no_grad()
def _zero_out(module: nn.Module, idx: int) -> bool | None:
    """Is output channel ``idx`` of a producer exactly zero? ``None``: not a producer."""
    if isinstance(module, _LAYERS) or is_conv1d(module):
        # one output channel/neuron: a row, or a column of transformers' Conv1D [in, out]
        w = module.weight[:, idx] if is_conv1d(module) else module.weight[idx]
        return not bool(w.any()) and (module.bias is None or float(module.bias[idx]) == 0.0)
    if isinstance(module, _NORMS):
        if getattr(module, "weight", None) is None:
            return False  # no affine: a constant channel is not zero
        return float(module.weight[idx]) == 0.0 and float(module.bias[idx]) == 0.0
    return None


def _name_of(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def _removable(model: nn.Module, example_input, ignored: list[nn.Module]):
    """The dependency graph, and per channel group ``(root, handler, root indices of the
    removable channels, not-removable count, reason kept)``; a layer always keeps one channel.
    Attention projections are not channel groups (their rows are heads: :mod:`.heads`)."""
    DG, found = analyse(model, example_input, ignored)
    plans = []
    for group in found:
        root = group.items[0].dep.target.module
        if DG.in_attention(root):
            continue
        n = len(group.items[0].idxs)
        producers = []
        for item in group.items:
            handler = getattr(item.dep.handler, "__name__", "")
            if handler == "prune_out_channels" and len(item.idxs) == n:
                producers.append((item.dep.target.module, [int(i) for i in item.idxs]))
        misfit = _misfit(producers)
        if misfit:  # a broadcast traced as a channel coupling (Qwen2-MoE's 1-output gate)
            plans.append((root, group.items[0].dep.handler, [], 0, misfit))
            continue
        zero_in = [[_zero_out(m, idxs[j]) for m, idxs in producers] for j in range(n)]
        removable = [
            j
            for j in range(n)
            if zero_in[j] and all(z is not False for z in zero_in[j]) and any(z for z in zero_in[j])
        ]
        partial = sum(1 for j in range(n) if any(zero_in[j]) and j not in set(removable))
        if len(removable) == n:  # never leave a layer with no channels at all
            removable = removable[1:]
            partial += 1
        root_idxs = [int(i) for i in group.items[0].idxs]
        reason = DG.refusal(group) if removable else None
        if reason:  # keep the zero channels: count them, say why
            partial += len(removable)
            removable = []
        plans.append((root, group.items[0].dep.handler, [root_idxs[j] for j in removable], partial,
                      reason))  # fmt: skip
    return DG, plans


def compact(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    ignored_layers: list[nn.Module] | None = None,
    inplace: bool = False,
    check: bool = True,
) -> tuple[nn.Module, CompactReport]:
    """Remove every removable zero channel and attention head; return the smaller model and
    a report.

    ``example_input`` traces the graph (any batch size). The last layer's outputs are kept
    (they are the model's outputs) unless ``ignored_layers`` says otherwise. The model is
    copied first unless ``inplace``. In eval mode, the compacted model's outputs equal the
    masked model's up to float rounding.

    ``check`` (default on) runs both models on ``example_input`` and on a seeded random input
    of its shape and raises :class:`CompactionError`, naming the first module whose output
    diverged, unless every output agrees to ``max|Δ| <= tol · max|y|`` (``tol`` from
    :data:`TOLERANCE` by dtype: 1e-4 in fp32). A failure inside Torch-Pruning is a
    ``CompactionError`` naming the layer too.
    """
    small = model if inplace else copy.deepcopy(model)
    was_training = small.training
    small.eval()
    ignored = ignored_layers if ignored_layers is not None else output_layers(small, example_input)
    if not inplace and ignored_layers is not None:  # map the caller's modules onto the copy
        names = _name_of(model)
        lookup = dict(small.named_modules())
        ignored = [lookup[names[m]] for m in ignored_layers]
    before = count(small, example_input)
    report = CompactReport(
        params_before=sum(p.numel() for p in small.parameters()),
        macs_before=before["macs"],
        all_macs_before=before["all_macs"],
    )
    inputs = [example_input, _second_input(example_input)]
    probes: dict[int, torch.Tensor] = {}
    refs = _reference(small, inputs, probes) if check else None
    report.heads_removed = heads.remove_zero_heads(small)
    maps, _ = neuron_maps(small, example_input)
    report.removed.update(remove_zero_neurons(small, maps))
    try:
        DG, plans = _removable(small, example_input, ignored)
    except GraphError as e:  # no channel removal for this model; heads still go
        DG, plans = None, []
        report.skipped["<model>"] = str(e)
    names = _name_of(small)
    for root, handler, idxs, partial, reason in plans:
        name = names.get(root, type(root).__name__)
        if partial:
            report.not_removable[name] = partial
        if reason:
            report.skipped[name] = reason
        if idxs:
            try:
                DG.get_pruning_group(root, handler, idxs).prune()
            except Exception as e:
                raise CompactionError(
                    f"removing {len(idxs)} zero channels of {name!r} ({type(root).__name__}) "
                    f"failed in Torch-Pruning: {type(e).__name__}: {e}. Leave {name!r} out of "
                    "the structured constraints (or report the model)."
                ) from e
            report.removed[name] = len(idxs)
    if check:
        dtype = next((p.dtype for p in small.parameters()), torch.float32)
        removed = {**report.removed, **{f"{k} (heads)": v for k, v in report.heads_removed.items()}}
        try:
            _verify(small, inputs, refs, TOLERANCE.get(dtype, 1e-4), removed, probes)
        except CompactionError as fp32:
            # post-processing (sorting, NMS, thresholds) can turn rounding into reordered or
            # missing outputs: an exact compaction agrees with the masked model in float64
            if inplace or dtype != torch.float32:
                raise
            wide = _float64_error(model, small, inputs, removed, probes)
            if wide is not None:
                raise wide from fp32
    report.params_after = sum(p.numel() for p in small.parameters())
    after = count(small, example_input)
    report.macs_after, report.sparse_macs_after = after["macs"], after["sparse_macs"]
    report.all_macs_after = after["all_macs"]
    small.train(was_training)
    return small, report


def _float64_error(
    model: nn.Module, small: nn.Module, inputs: list, removed: dict, probes: dict
) -> CompactionError | None:
    """None when the masked and the compact model agree to float64's tolerance on ``inputs``, in
    their outputs or, where post-processing after the modules (thresholds, sorting, NMS over
    exactly tied scores) turns rounding into different outputs, in every module's output; else
    the float64 check's error (it names the first diverging module)."""
    wide = [_float64(x) for x in inputs]
    masked, compact_ = copy.deepcopy(model).double().eval(), copy.deepcopy(small).double()
    try:
        refs = _reference(masked, wide, probes)
        _verify(compact_, wide, refs, TOLERANCE[torch.float64], removed, probes)
    except CompactionError as e:
        # every module that kept its shape (the protected output layers among them) agreed to
        # 1e-8 of its scale: the compaction is exact, the difference is the post-processing's
        return None if e.where == AFTER_MODULES else e
    return None


def _float64(x):
    if torch.is_tensor(x):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _float64(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_float64(v) for v in x)
    return x


def zero_dead_inputs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Zero, in place, every consumer weight that reads a removable channel; returns how many
    weights that zeroed.

    Such a weight multiplies a channel that is identically 0, so the model's function does not
    change; what changes is what it stores: the consumer's input slice of a pruned filter (a
    column block of the next conv, the Linear's inputs after a flatten, an expert's
    ``down_proj`` column of a pruned neuron) is zero, as it is absent from the compact model.
    The storage accounting of a structured model needs it.
    """
    was_training = model.training
    model.eval()
    try:
        zeroed = zero_dead_neurons(model, neuron_maps(model, example_input)[0])
        try:
            DG, plans = _removable(model, example_input, output_layers(model, example_input))
        except GraphError:
            return zeroed  # no removable channel is known (compact reports why)
        for root, handler, idxs, *_ in plans:
            if not idxs:
                continue
            for item in DG.get_pruning_group(root, handler, idxs).items:
                m = item.dep.target.module
                if getattr(item.dep.handler, "__name__", "") != "prune_in_channels":
                    continue
                conv1d = is_conv1d(m)
                if not (isinstance(m, _LAYERS) or conv1d) or getattr(m, "groups", 1) != 1:
                    continue  # grouped/depthwise convs: their inputs are their outputs' channels
                cols = torch.as_tensor([int(i) for i in item.idxs], device=m.weight.device)
                w = m.weight.T if conv1d else m.weight  # [in, out] → inputs are rows
                with torch.no_grad():  # not around the tracing: the graph needs autograd
                    zeroed += int(w[:, cols].count_nonzero())
                    w[:, cols] = 0
    finally:
        model.train(was_training)
    return zeroed
