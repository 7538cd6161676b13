"""The calibration side of one-shot pruning: each constrained layer's GEMM view (``_View``: a
Conv/Linear, a ``Conv1D``, one expert of a fused experts weight), the layers found in forward
order over every calibration batch, and the Grams ``H = XᵀX`` accumulated by forward hooks
(an expert's from exactly its routed tokens, through :class:`~admmprune.weights.experts.ExpertTap`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional

from ...weights.experts import ExpertTap
from ...weights.gemm import is_conv1d
from ...weights.select import Target

__all__: list[str] = []  # internal: the one-shot driver's


class _View:
    """How a layer's weight and inputs map onto the GEMM ``Y = X Wᵀ``, per conv group:
    weights as ``[G, rows, d]``, inputs as ``[G, n, d]``. ``expert``: the slice ``W[expert]``
    of a fused experts weight, a GEMM of its own (``key`` says where it runs: the module, or
    the experts site)."""

    def __init__(self, t: Target, expert: int | None = None) -> None:
        m, W = t.module, t.param
        self.name = t.name if expert is None else f"{t.name}[{expert}]"
        self.expert = expert
        self.key = m if expert is None else (m, t.attr, expert)
        if t.attr != "weight" and expert is None:
            raise ValueError(
                f"one-shot pruning reconstructs layer outputs, so it constrains a layer's "
                f"weight; {t.name!r} is not one. Leave it out of the spec."
            )
        self.transposed = False
        if expert is not None:
            self.kind, self.G, self.transposed = "linear", 1, t.transposed
            W = W[expert]
        elif isinstance(m, nn.Linear):
            self.kind, self.G = "linear", 1
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            self.kind, self.G = "conv", m.groups
        elif is_conv1d(m) and W.ndim == 2:
            self.kind, self.G, self.transposed = "linear", 1, True
        else:
            raise ValueError(
                f"one-shot pruning reconstructs nn.Linear, nn.Conv1d/Conv2d and transformers' "
                f"Conv1D; {t.name!r} is a {type(m).__name__}. Leave it out of the spec, or prune "
                "it with admmprune.prune / ADMM."
            )
        self.shape = tuple(W.t().shape) if self.transposed else tuple(W.shape)  # the GEMM shape
        self.rows = self.shape[0] // self.G
        self.d = math.prod(self.shape[1:])
        self.module = m
        if self.kind == "conv":
            self.signature = ("conv", m.kernel_size, m.stride, m.padding, m.dilation, self.G,
                              m.padding_mode, self.d)  # fmt: skip
        else:
            self.signature = ("linear", self.d)

    def weight(self, t: Target) -> torch.Tensor:
        """This layer's weight in the model (the expert's slice: a view, written in place)."""
        return t.param if self.expert is None else t.param[self.expert]

    def w3(self, W: torch.Tensor) -> torch.Tensor:
        """The parameter as ``[G, rows, d]`` fp32 (a copy)."""
        W = W.detach().t() if self.transposed else W.detach()
        return (
            W.float()
            .reshape(self.G, self.rows, self.d)
            .clone(memory_format=torch.contiguous_format)
        )

    def gemm(self, W3: torch.Tensor) -> torch.Tensor:
        """``[G, rows, d]`` → the GEMM-view shape the constraints project."""
        return W3.reshape(self.shape)

    def param(self, W3: torch.Tensor) -> torch.Tensor:
        """``[G, rows, d]`` → the parameter's own shape."""
        W = W3.reshape(self.shape)
        return W.t() if self.transposed else W

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as GEMM rows, ``[G, n, d]`` fp32."""
        if self.kind == "linear":
            return x.reshape(1, -1, self.d).float()
        m = self.module
        conv2d = isinstance(m, nn.Conv2d)
        if x.dim() == (3 if conv2d else 2):  # unbatched
            x = x.unsqueeze(0)
        if not conv2d:  # Conv1d as a conv over [1, L]
            x = x.unsqueeze(2)
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = functional.pad(x.float(), m._reversed_padding_repeated_twice, mode=mode)
        k, s, dil = m.kernel_size, m.stride, m.dilation
        if not conv2d:
            k, s, dil = (1, k[0]), (1, s[0]), (1, dil[0])
        P = functional.unfold(x, k, dilation=dil, stride=s)  # [N, C·K, L], channel-major like W
        return P.transpose(1, 2).reshape(-1, self.G, self.d).transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# statistics


class _StopForwardError(Exception):
    """Raised by a hook once a block has all its inputs for this batch: skip the rest."""


def _stop_forward(*_) -> None:
    """A hook that ends the forward: the layers a pass needs have run."""
    raise _StopForwardError


class _CalibrationError(ValueError):
    """Bad calibration data found by a hook (it names the batch and layer itself)."""


class _Gram:
    """``H = Σ XᵀX`` per conv group (fp32) and the number of rows of ``X`` seen; with the
    dense model's inputs ``X_d`` to the same layer, also ``C = Σ X_dᵀX`` (``dense_target``)."""

    def __init__(self, view: _View, device, cross: bool = False) -> None:
        self.H = torch.zeros(view.G, view.d, view.d, device=device)
        self.C = torch.zeros_like(self.H) if cross else None
        self.n = 0
        self.view = view

    def add(self, x: torch.Tensor, batch: int, x_dense: torch.Tensor | None = None) -> None:
        X = self.view.inputs(x.detach())
        if not bool(torch.isfinite(X.sum())):
            raise _CalibrationError(
                f"calibration batch {batch}: the input of {self.view.name!r} holds NaN/Inf "
                "activations; check the calibration data (normalisation, dtype) and the model."
            )
        self.H.baddbmm_(X.transpose(1, 2), X)
        if self.C is not None:
            Xd = self.view.inputs(x_dense.detach())
            self.C.baddbmm_(Xd.transpose(1, 2), X)
        self.n += X.shape[1]


def _count(batch) -> int:
    """Samples in one calibration batch: the leading size of its first tensor."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if torch.is_tensor(v):
            return int(v.shape[0]) if v.dim() else 1
    return 1


def _to(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _describe(batch) -> str:
    if torch.is_tensor(batch):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "a dict of " + ", ".join(
            f"{k}: {tuple(v.shape) if torch.is_tensor(v) else type(v).__name__}"
            for k, v in batch.items()
        )
    return f"a {type(batch).__name__}"


def _forward(model: nn.Module, batch, i: int, device) -> None:
    """``model(x)`` / ``model(**x)`` / ``model(*x)``; a failure names the batch."""
    batch = _to(batch, device)
    try:
        if torch.is_tensor(batch):
            model(batch)
        elif isinstance(batch, Mapping):
            model(**batch)
        elif isinstance(batch, (tuple, list)):
            model(*batch)
        else:
            raise TypeError(f"{type(batch).__name__} is not a tensor, dict or tuple")
    except (_StopForwardError, _CalibrationError):
        raise
    except Exception as e:
        raise ValueError(
            f"calibration batch {i} ({_describe(batch)}) failed in "
            f"{type(model).__name__}.forward: {type(e).__name__}: {e}. Calibration batches are "
            "passed as model(x) for a tensor, model(**x) for a dict, model(*x) for a tuple; "
            "give inputs only (no labels)."
        ) from e


@contextlib.contextmanager
def _tapped(pre: dict, stop=None):
    """``pre[key](x)`` with the input ``x`` before each watched layer runs (``key``: a module,
    or an experts site, seen through :class:`ExpertTap`); once ``stop`` has run, the forward
    ends (``_StopForwardError``). Yields the tap, or None when no expert is watched."""

    handles, sites = [], {}
    for key, fn in pre.items():
        if isinstance(key, nn.Module):
            handles.append(key.register_forward_pre_hook(lambda _m, args, fn=fn: fn(args[0])))
        else:
            sites[key] = (lambda _site, x, fn=fn: fn(x), None)
    if isinstance(stop, nn.Module):
        handles.append(stop.register_forward_hook(_stop_forward))
    elif stop is not None:
        sites[stop] = (sites.get(stop, (None, None))[0], _stop_forward)
    tap = ExpertTap.over(sites) if sites else None
    try:
        with tap if tap is not None else contextlib.nullcontext():
            yield tap
    finally:
        for h in handles:
            h.remove()


def _blocks_of(calls) -> tuple[list[list[_View]], bool]:
    """One batch's calls ``[(view, input)]`` in order → runs of layers reading one input tensor
    (first calls only), and whether no layer ran twice."""
    seen: dict[str, int] = {}
    blocks: list[list[_View]] = []
    last_key = None
    for view, x in calls:
        seen[view.name] = seen.get(view.name, 0) + 1
        if seen[view.name] > 1:
            continue
        key = (id(x), view.signature)
        if key == last_key:
            blocks[-1].append(view)
        else:
            blocks.append([view])
        last_key = key
    return blocks, all(n == 1 for n in seen.values())


def _discover(model, views: dict, batches, device) -> tuple[list, bool, list[_View]]:
    """Run every calibration batch: the layers in call order, grouped into blocks that read the
    same input tensor; whether no layer runs twice in one forward (then a pass may stop
    early); and the experts no batch routed a token to.

    A layer first called in a later batch (an expert batch 1 did not route to) joins the
    order right after the block called before it in that batch."""
    order: list[str] = []  # blocks by their first layer's name
    blocks: dict[str, list[_View]] = {}
    where: dict[str, str] = {}  # layer name → its block
    once = True
    experts = {v.module for v in views.values() if v.expert is not None}
    ran: set[nn.Module] = set()
    used: dict = {}
    for i, batch in enumerate(batches, 1):
        calls: list[tuple[_View, torch.Tensor]] = []  # tensors kept alive: ids stay unique
        pre = {v.key: (lambda x, v=v, rec=calls.append: rec((v, x))) for v in views.values()}
        handles = [m.register_forward_pre_hook(lambda m, _a: ran.add(m)) for m in experts]
        try:
            with _tapped(pre) as tap:
                _forward(model, batch, i, device)
        finally:
            for h in handles:
                h.remove()
        if tap is not None:
            used.update(tap.layouts)
        found, batch_once = _blocks_of(calls)
        once = once and batch_once
        del calls
        pos = -1
        for group in found:
            known = [where[v.name] for v in group if v.name in where]
            if known:
                b = known[0]
                pos = order.index(b)
            else:
                b = group[0].name
                blocks[b] = []
                pos += 1
                order.insert(pos, b)
            for v in group:
                if v.name not in where:
                    blocks[b].append(v)
                    where[v.name] = b
    _check_experts(views, ran, used, where)
    missing = [v.name for v in views.values() if v.name not in where and v.expert is None]
    if missing:
        raise ValueError(
            f"{missing[0]!r} is never called when the model runs on the calibration input "
            f"({len(batches)} batch(es)), so it has no statistics; leave it out of the spec."
        )
    unseen = [v for v in views.values() if v.expert is not None and v.name not in where]
    return [blocks[b] for b in order], once, unseen


def _check_experts(views: dict, ran: set, used: dict, where: dict) -> None:
    """Refuse fused experts whose per-expert GEMMs could not be observed, or whose layout
    (``[E, out, in]`` for ``F.linear``, ``[E, in, out]`` for ``x @ W``) is not the one the
    module declares: their statistics would be missing or wrong."""
    for v in views.values():
        if v.expert is None:
            continue
        m, attr, _ = v.key
        if m not in ran:
            raise ValueError(
                f"{v.name.rsplit('[', 1)[0]!r}: its experts module never runs on the calibration "
                "input, so no expert has statistics; leave it out of the spec."
            )
        how = used.get((m, attr))
        if how is None:
            raise ValueError(
                f"{v.name.rsplit('[', 1)[0]!r}: its experts module ran, but no expert's GEMM "
                f"was seen. admmprune reads each expert as F.linear(x, W[e]) or x @ W[e] in the "
                f"eager forward of {type(m).__name__}, and this class computes them another "
                "way; leave its experts out of the spec (or prune them with admmprune.prune)."
            )
        if (how == "matmul") != v.transposed:
            raise ValueError(
                f"{v.name.rsplit('[', 1)[0]!r}: {type(m).__name__} runs its experts as "
                f"{'x @ W[e]' if how == 'matmul' else 'F.linear(x, W[e])'}, but declares "
                f"is_transposed={v.transposed}; the GEMM view would be wrong, so it is refused."
            )


def _collect(run, n_batches: int, blocks, device, stop_early: bool, dense=None) -> dict[str, _Gram]:
    """Grams of every layer in ``blocks`` over all batches (layers of a block share one);
    ``run(i)`` runs batch ``i`` (1-based) through the model or one block of it. ``dense``:
    ``(run_dense, {layer: its dense twin})``: batch ``i`` first runs through the dense copy,
    whose layers' inputs give the cross Grams."""
    grams: dict[str, _Gram] = {}
    hooks = {}
    for block in blocks:
        g = _Gram(block[0], device, cross=dense is not None)
        for v in block:
            grams[v.name] = g
        hooks[block[0].key] = g  # the block's first layer reads the shared input
    last = blocks[-1][-1].key
    batch_no = [0]
    seen: dict[nn.Module, torch.Tensor] = {}  # this batch's dense input per layer
    pre = {
        key: (lambda x, key=key, g=g: g.add(x, batch_no[0], seen.pop(key, None)))
        for key, g in hooks.items()
    }

    handles = []
    if dense is not None:  # every key is a module here (experts are refused with it)
        run_dense, twin = dense
        for m in hooks:
            handles.append(twin[m].register_forward_pre_hook(
                lambda _t, args, m=m: seen.__setitem__(m, args[0])))  # fmt: skip
        if stop_early:
            handles.append(twin[last].register_forward_hook(_stop_forward))
    try:
        with _tapped(pre, last if stop_early else None):
            for i in range(1, n_batches + 1):
                batch_no[0] = i
                if dense is not None:
                    with contextlib.suppress(_StopForwardError):
                        run_dense(i)
                with contextlib.suppress(_StopForwardError):
                    run(i)
    finally:
        for h in handles:
            h.remove()
    return grams
