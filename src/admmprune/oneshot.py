r"""One-shot (post-training) pruning and quantization from calibration data, layer by layer.

For each constrained layer with weight ``W`` (GEMM view: rows = outputs, columns = the input
features; for a conv, the unfolded patches) and calibration inputs ``X`` (rows = samples /
positions), solve, with no retraining::

    min_Ŵ ||X Ŵᵀ − X Wᵀ||²_F = tr((Ŵ − W) H (Ŵ − W)ᵀ),   H = XᵀX   s.t.  Ŵ ∈ S

``H`` is accumulated in fp32 by forward hooks over the calibration batches (``X`` is never
held whole) and damped: ``H + damp·mean(diag H)·I``. Every set of :mod:`admmprune.constraints`
plugs in (``Filters`` excepted: a removed output cannot be reconstructed inside its layer), and
a quantization set (:class:`~admmprune.Quantized`, ``Ternary``, ``Binary``) alone or
intersected with a sparsity set quantizes the kept weights with the same ``H``.

Solvers (one interface, the same statistics):

- ``"magnitude"``: ``Ŵ = Π_S(W)``; no update.
- ``"wanda"`` (Sun et al. 2024): the support of ``Π_S(W·diag(||X_j||))`` (score
  ``|W_ij|·||X_j||₂``; per output row with ``Unstructured(keep, per_row=True)``); no update.
- ``"sparsegpt"`` (Frantar & Alistarh 2023): the OBS column sweep with the upper Cholesky
  factor of ``H⁻¹``, blocks of 128 columns, the mask chosen adaptively per block (N:M per group
  of m columns), each column's error propagated to the later columns; Unstructured and N:M.
- ``"admm"`` (ours, after Boža 2024), in the variables scaled by ``D = diag(H)^½`` (``H`` with
  a unit diagonal; the sparsity sets are unchanged by column scaling)::

      Ŵ ← (H W + ρ(Z − U)) (H + ρI)⁻¹       (H + ρI)⁻¹ from a Cholesky, once per value of ρ
      Z ← Π_{S_k}(Ŵ + U),  U ← U + Ŵ − Z    (U rescaled when ρ grows, as in admm.py)

  ``S_k`` reaches the target on a cubic schedule over the first ``ramp`` iterations (the
  support is fixed gradually), ρ grows by ``rho_growth`` every ``rho_every`` iterations; then
  the exact least squares on the final support (per row ``H_ss ŵ_s = (H w)_s``: one Cholesky
  when every row shares the support, batched conjugate gradients otherwise). A quantization
  set then runs ADMM in the unscaled variables with ``Z = Π_Q`` of the kept entries (zero
  elsewhere), and the final scale is refitted in closed form for the chosen codes.

``sequential=True`` processes blocks in forward order, each block's statistics computed from
the outputs of the already-pruned layers before it (SparseGPT's sequential mode). A block is a
run of layers that read the same input tensor (e.g. attention's q, k, v): they share one Gram.
Only one block's Grams are alive at a time. ``sequential="layers"`` is the coarser protocol of
llm-compressor's sequential pipeline: each transformer layer's statistics come from the pruned
layers before it, but every block inside one layer is calibrated from the same pass through
the still-dense layer (one pass per layer; the layer's Grams are held together).
``sequential=False`` calibrates every block from the dense model.

``dense_target=True`` (admm) fits each layer to the *dense* model's output from its pruned
inputs ``X̃``: ``min ||X̃Ŵᵀ − XWᵀ||²``, i.e. ``H = X̃ᵀX̃`` and the linear term ``W·XᵀX̃`` (damped
like ``H``) in place of ``W·H``; the dense inputs come from a dense twin run beside the model.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional

from ._graph import is_conv1d
from ._graph import no_cache as _no_cache
from .constraints import (
    NM,
    Constraint,
    Filters,
    Intersection,
    Unstructured,
    keep_count,
)
from .experts import ExpertTap, eager_experts, expert_weights, is_router
from .masks import Masks
from .quantization import _Levels, levels_for, nearest_level
from .select import Spec, Target, select

__all__ = ["SOLVERS", "LayerReport", "OneShotReport", "oneshot"]

SOLVERS = ("admm", "sparsegpt", "wanda", "magnitude")


# ---------------------------------------------------------------------------------------------
# reports


@dataclass
class LayerReport:
    """One layer's result: its summed reconstruction error ``||X(Ŵ − W)ᵀ||²`` (``error``), the
    same relative to ``||XWᵀ||²`` (``rel_error``), kept fraction, rows of X seen (for an expert:
    the tokens routed to it), seconds, and the solver that ran (``"magnitude"`` for an expert
    routed fewer than ``min_expert_tokens`` tokens)."""

    name: str
    error: float
    rel_error: float
    kept: float
    rows: int
    seconds: float
    solver: str = ""


@dataclass
class OneShotReport:
    """What :func:`oneshot` did: samples and batches used, per-layer results, the peak bytes
    of statistics held at once (``gram_bytes_peak``), and the wall time."""

    solver: str
    samples: int
    batches: int
    sequential: bool | str  # True, "layers" or False (see oneshot)
    damp: float
    layers: dict[str, LayerReport] = field(default_factory=dict)
    gram_bytes_peak: int = 0
    seconds: float = 0.0
    # sequential through this nn.ModuleList one block at a time, from cached block inputs
    # (None: from the model's input for every block of layers)
    by_layer: str | None = None
    activation_bytes_peak: int = 0  # the cached block inputs (by_layer only)
    # the block lists whose layers one constraint went on (oneshot(model, constraint, ...))
    block_lists: list[str] = field(default_factory=list)

    @property
    def fallbacks(self) -> dict[str, int]:
        """Experts pruned by magnitude for want of routed tokens: ``{name: tokens seen}``."""
        return {n: r.rows for n, r in self.layers.items() if r.solver != self.solver}

    @property
    def error(self) -> float:
        """The layers' reconstruction errors summed."""
        return sum(r.error for r in self.layers.values())

    def as_dict(self) -> dict:
        out = asdict(self)
        out["error"] = self.error
        out["fallbacks"] = self.fallbacks
        return out

    def summary(self) -> str:
        return (
            f"one-shot {self.solver}: {len(self.layers)} layers from {self.samples} calibration "
            f"samples ({self.batches} batches, {_MODES[self.sequential]}),"
            f" summed layer error {self.error:.4g}, Grams peak "
            f"{self.gram_bytes_peak / 2**20:.1f} MiB"
            + (
                f", block inputs peak {self.activation_bytes_peak / 2**20:.1f} MiB"
                if self.by_layer
                else ""
            )
            + f", {self.seconds:.1f} s"
            + (
                f"; {len(self.fallbacks)} expert(s) routed too few calibration tokens pruned by "
                f"magnitude: {', '.join(list(self.fallbacks)[:8])}"
                + (" …" if len(self.fallbacks) > 8 else "")
                if self.fallbacks
                else ""
            )
        )


# ---------------------------------------------------------------------------------------------
# the GEMM view of a layer


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


# ---------------------------------------------------------------------------------------------
# one block of layers at a time (decoder layers of a language model)


def _layer_list(model: nn.Module, targets: list[Target]) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` of blocks of one class (a transformer's decoder or encoder layers)
    that holds every constrained layer, if there is one."""
    names = [t.module_name for t in targets]
    holding = [(n, m) for n, m in _block_lists(model) if all(t.startswith(f"{n}.") for t in names)]
    return max(holding, key=lambda x: len(x[1]), default=None)


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every non-empty ``nn.ModuleList`` of modules of one class, with its name (one block
    counts: a 1-layer transformer is still a list of layers)."""
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) >= 1 and len({type(c) for c in m}) == 1
    ]  # fmt: skip


def _gemm_layers(block: nn.Module) -> list[str]:
    """Names (relative to ``block``) of its Linear / ``Conv1D`` layers and fused expert weights,
    never a router (a Linear scoring the experts beside it)."""
    parents = {n: m for n, m in block.named_modules()}
    out = []
    for n, m in block.named_modules():
        parent = parents.get(n.rpartition(".")[0])
        if n and (isinstance(m, nn.Linear) or is_conv1d(m)) and not is_router(n, m, parent):
            out.append(n)
        out += [f"{n}.{a}" if n else a for a in expert_weights(m)]
    return out


def _blocks_spec(model: nn.Module, constraint: Constraint) -> tuple[dict, list[str]]:
    """``{layer name: constraint}`` for every Linear / transformers' ``Conv1D`` / fused expert
    weight inside every outermost ``nn.ModuleList`` of identical blocks (an encoder's and a
    decoder's layers, a vision tower's: a list nested inside a block never replaces the
    block list); and the names of those lists."""
    layers = {n: [_gemm_layers(b) for b in m] for n, m in _block_lists(model)}
    lists = [n for n, per_block in layers.items() if any(per_block)]
    if not lists:
        raise ValueError(
            f"oneshot(model, {constraint!r}, ...): {type(model).__name__} has no list of "
            "identical blocks (transformer layers) holding Linear layers to apply one "
            "constraint to; give a spec {name or glob: constraint}."
        )
    outer = [n for n in lists if not any(n.startswith(f"{o}.") for o in lists)]
    spec = {
        f"{name}.{i}.{n}": constraint
        for name in outer
        for i, names in enumerate(layers[name])
        for n in names
    }
    return spec, outer


def _capture(model, first: nn.Module, batches, device) -> list[tuple[tuple, dict]]:
    """Each batch's ``(args, kwargs)`` into ``first`` (the forward stops there)."""
    store = []

    def pre(module, args, kwargs):
        store.append((args, kwargs))
        raise _StopForwardError

    handle = first.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for i, batch in enumerate(batches, 1):
            with contextlib.suppress(_StopForwardError):
                _forward(model, batch, i, device)
    finally:
        handle.remove()
    if len(store) != len(batches):
        raise ValueError(
            f"{type(first).__name__} (the first block) was not reached by every calibration "
            "batch; pass by_layer=False."
        )
    return store


def _advance(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The next block's inputs: this block's outputs in place of its hidden states."""
    out = []
    for args, kwargs in inputs:
        y = block(*args, **kwargs)
        y = y[0] if isinstance(y, (tuple, list)) else y
        if args:
            out.append(((y, *args[1:]), kwargs))
        else:
            key = next(k for k, v in kwargs.items() if torch.is_tensor(v))
            out.append(((), {**kwargs, key: y}))
    return out


def _twins(model: nn.Module, copy_: nn.Module) -> dict[nn.Module, nn.Module]:
    """Each module of ``model`` → the same module in its deep copy."""
    return dict(zip(model.modules(), copy_.modules(), strict=True))


def _block_runner(block: nn.Module, inputs):
    """``run(i)`` for :func:`_collect`: block ``block`` on batch ``i``'s cached inputs."""

    def run(i: int):
        args, kwargs = inputs[i - 1]
        return block(*args, **kwargs)

    return run


def _bytes(inputs) -> int:
    return sum(
        v.numel() * v.element_size()
        for args, kwargs in inputs
        for v in (*args, *kwargs.values())
        if torch.is_tensor(v)
    )


# ---------------------------------------------------------------------------------------------
# the sets, split for the solvers


def _split(c: Constraint, name: str) -> tuple[Constraint | None, _Levels | None]:
    """A spec entry as (sparsity set, quantization set); either may be None."""
    parts = c.parts if isinstance(c, Intersection) else (c,)
    levels = [p for p in parts if isinstance(p, _Levels)]
    sparse = [p for p in parts if not isinstance(p, _Levels)]
    if any(isinstance(p, Filters) for p in sparse):
        raise ValueError(
            f"{name!r}: Filters removes output rows, which no update inside the layer can "
            "reconstruct. Prune the next layer's input channels with Columns/Channels instead "
            "(one-shot reconstructs that layer), or use training-time ADMM for filters."
        )
    if len(levels) > 1:
        raise ValueError(f"{name!r}: {c!r} has two quantization sets; give one.")
    lv = levels[0] if levels else None
    if not sparse:
        return None, lv
    return (sparse[0] if len(sparse) == 1 else Intersection(*sparse)), lv


def _mask3(view: _View, sparse: Constraint, V3: torch.Tensor) -> torch.Tensor:
    """The support ``Π_S(V)`` chooses, as ``[G, rows, d]``."""
    return sparse.project(view.gemm(V3), view.G).support.reshape(V3.shape)


def _quantize_on(lv: _Levels, V3: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``Π_Q`` of the kept entries of ``V3`` (the whole layer shares one scale), 0 elsewhere."""
    kept = lv.project(V3[S]).Z
    return torch.zeros_like(V3).masked_scatter_(S, kept)


def _error(H: torch.Tensor, delta: torch.Tensor) -> float:
    """``tr(Δ H Δᵀ)`` summed over groups."""
    return float((torch.bmm(delta, H) * delta).sum())


# ---------------------------------------------------------------------------------------------
# solvers: each maps (view, W [G, r, d], damped H [G, d, d], sets, options) → (Ŵ, support)


def _magnitude(view, W, H, sparse, lv, **_):
    S = _mask3(view, sparse, W) if sparse is not None else torch.ones_like(W, dtype=torch.bool)
    out = W * S
    return (_quantize_on(lv, out, S) if lv is not None else out), S


def _wanda(view, W, H, sparse, lv, *, x_norms, **_):
    if sparse is None:
        return _magnitude(view, W, H, sparse, lv)
    S = _mask3(view, sparse, W * x_norms.unsqueeze(1))  # |W_ij|·||X_j||, undamped
    out = W * S
    return (_quantize_on(lv, out, S) if lv is not None else out), S


def _sparsegpt(view, W, H, sparse, lv, *, blocksize: int = 128, **_):
    if sparse is not None and not isinstance(sparse, (Unstructured, NM)):
        raise ValueError(
            f"{view.name!r}: solver='sparsegpt' chooses Unstructured and N:M masks (its paper's "
            f"sets), not {sparse!r}; use solver='admm' for it."
        )
    levels = None
    if lv is not None:  # the joint mode quantizes on a grid fixed up front (as GPTQ does)
        ref = _magnitude(view, W, H, sparse, None)[0]
        levels = levels_for(lv, ref[ref != 0] if bool((ref != 0).any()) else ref.flatten())
    outs, supports = [], []
    for g in range(W.shape[0]):
        w, s = _sparsegpt_one(W[g], H[g], sparse, levels, blocksize)
        outs.append(w)
        supports.append(s)
    return torch.stack(outs), torch.stack(supports)


def _prune_counts(sparse, rows: int, d: int, i1: int, i2: int):
    """How many weights the block of columns ``[i1, i2)`` prunes: per row (``per_row``) or in
    the whole block, so that the totals after the last block are exactly the target's."""
    if sparse.per_row:
        p = d - keep_count(sparse.keep, d)
        return math.floor(p * i2 / d + 0.5) - math.floor(p * i1 / d + 0.5)
    p = rows * d - keep_count(sparse.keep, rows * d)
    return math.floor(p * i2 / d + 0.5) - math.floor(p * i1 / d + 0.5)


def _sparsegpt_one(W, H, sparse, levels, blocksize: int):
    """Frantar & Alistarh 2023, Algorithm 1 on one ``[r, d]`` weight."""
    W = W.clone()
    r, d = W.shape
    L = torch.linalg.cholesky(H.double())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(W.dtype)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    nm = isinstance(sparse, NM)
    B = max(sparse.m, blocksize // sparse.m * sparse.m) if nm else blocksize
    for i1 in range(0, d, B):
        i2 = min(i1 + B, d)
        W1 = W[:, i1:i2].clone()
        U1 = Hinv[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        P1 = torch.zeros_like(W1, dtype=torch.bool)
        diag = torch.diagonal(U1)
        if isinstance(sparse, Unstructured):
            score = W1.pow(2) / diag.pow(2)
            p = _prune_counts(sparse, r, d, i1, i2)
            if sparse.per_row:
                idx = torch.sort(score, dim=1, stable=True).indices[:, :p]
                P1.scatter_(1, idx, True)
            elif p > 0:
                idx = torch.sort(score.flatten(), stable=True).indices[:p]
                P1.view(-1)[idx] = True
        for j in range(i2 - i1):
            if nm and j % sparse.m == 0:
                score = W1[:, j : j + sparse.m].pow(2) / diag[j : j + sparse.m].pow(2)
                idx = torch.sort(score, dim=1, stable=True).indices[:, : sparse.m - sparse.n]
                P1[:, j : j + sparse.m].scatter_(1, idx, True)
            w = W1[:, j]
            q = w.masked_fill(P1[:, j], 0)
            if levels is not None:
                q = torch.where(P1[:, j], q, nearest_level(q, levels))
            err = (w - q) / U1[j, j]
            W1[:, j:].sub_(err.unsqueeze(1) * U1[j, j:].unsqueeze(0))
            W1[:, j] = q  # exactly: pruned entries are +0.0, kept ones on their level
            E1[:, j] = err
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = P1
        W[:, i2:].sub_(E1 @ Hinv[i1:i2, i2:])
    return W, ~pruned


class _Inverses:
    """``(H + ρI)⁻¹`` per value of ρ, from a float64 Cholesky factorization (cached: ρ changes
    only every few iterations). A ρ change costs one d×d inversion, and each W-step is then
    one GEMM; an eigendecomposition would serve every ρ but costs ~10–30× a Cholesky on CPU
    and two GEMMs per step."""

    def __init__(self, H: torch.Tensor) -> None:
        self.H, self.rho, self.inv = H, None, None

    def __call__(self, rho: float) -> torch.Tensor:
        if rho != self.rho:
            eye = torch.eye(self.H.shape[-1], dtype=torch.float64, device=self.H.device)
            L = torch.linalg.cholesky(self.H.double() + rho * eye)
            self.inv, self.rho = torch.cholesky_inverse(L).to(self.H.dtype), rho
        return self.inv


def _w_step(B, Z, U, rho, inverses: _Inverses):
    """``Ŵ = (B + ρ(Z − U)) (H + ρI)⁻¹`` with ``B = W H``."""
    return torch.bmm(B + rho * (Z - U), inverses(rho))


def _least_squares(W0, H, S, W_start, *, tol: float, max_iter: int, B=None):
    """``argmin tr(Ŵ H Ŵᵀ) − 2 tr(Ŵ Bᵀ)`` over Ŵ supported on ``S`` (``B = W0 H`` unless
    given: ``tr((Ŵ − W0) H (Ŵ − W0)ᵀ)``), per row ``H_ss ŵ_s = b_s``: one Cholesky when every
    row of a group shares its support, otherwise conjugate gradients on ``M ⊙ (Ŵ H) = M ⊙ B``
    from ``W_start``."""
    out = torch.zeros_like(W0)
    Mf = S.to(W0.dtype)
    own = B is None  # then a row that keeps everything is W0 itself
    B = (torch.bmm(W0, H) if own else B) * Mf
    for g in range(W0.shape[0]):
        if bool((S[g] == S[g, :1]).all()):
            idx = S[g, 0].nonzero().flatten()
            if idx.numel():
                Hs = H[g][idx][:, idx].double()
                sol = torch.cholesky_solve(B[g][:, idx].double().T, torch.linalg.cholesky(Hs))
                out[g][:, idx] = sol.T.to(W0.dtype)
            continue
        out[g] = _cg(H[g], B[g], Mf[g], W_start[g] * Mf[g], tol, max_iter)
        if own:
            full = S[g].all(dim=1)  # a row that keeps everything is its own least squares
            out[g][full] = W0[g][full]
    return out


def _cg(H, B, M, X, tol: float, max_iter: int):
    """Batched conjugate gradients, one system per row: ``M ⊙ (x H) = b`` on the support."""
    R = B - (X @ H) * M
    P = R.clone()
    rs = (R * R).sum(1)
    bound = (tol**2) * (B * B).sum(1).clamp_min(1e-30)
    for _ in range(max_iter):
        if bool((rs <= bound).all()):
            break
        AP = (P @ H) * M
        alpha = rs / (P * AP).sum(1).clamp_min(1e-30)
        X = X + alpha.unsqueeze(1) * P
        R = R - alpha.unsqueeze(1) * AP
        rs_new = (R * R).sum(1)
        P = R + (rs_new / rs.clamp_min(1e-30)).unsqueeze(1) * P
        rs = rs_new
    return X


def _admm(view, W, H, sparse, lv, *, iters: int = 40, ramp: int = 30, rho: float = 0.01,
          rho_growth: float = 1.3, rho_every: int = 3, cg_tol: float = 1e-4,
          cg_iters: int = 50, quant_iters: int = 30, quant_rho: float = 0.01,
          quant_rho_growth: float = 1.2, C=None, **_):  # fmt: skip
    S = torch.ones_like(W, dtype=torch.bool)
    out = W
    if sparse is not None and bool(_mask3(view, sparse, W).all()) and C is None:
        sparse = None  # the set keeps every weight (e.g. keep=1): W is the exact solution
    if sparse is not None:
        D = torch.diagonal(H, dim1=1, dim2=2).sqrt()  # scale to a unit diagonal
        Hn = H / D.unsqueeze(2) / D.unsqueeze(1)
        Wn = W * D.unsqueeze(1)
        inverses = _Inverses(Hn)
        # the linear term W·H (or W·C for the dense target), in the scaled variables
        Bn = torch.bmm(Wn, Hn) if C is None else torch.bmm(W, C) / D.unsqueeze(1)
        if C is not None:  # start from the unconstrained optimum B H⁻¹
            Wn = torch.linalg.solve(Hn.double(), Bn.double().transpose(1, 2))
            Wn = Wn.transpose(1, 2).to(W.dtype)
        Z, U = Wn, torch.zeros_like(Wn)  # dense start: the ramp prunes from k = 0 on
        Wh = Wn
        for k in range(iters):
            rho_k = rho * rho_growth ** (k // rho_every)
            Wh = _w_step(Bn, Z, U, rho_k, inverses)
            frac = min(1.0, (k + 1) / max(1, ramp)) ** 3
            S_k = sparse.with_keep(lambda keep, f=frac: 1.0 - (1.0 - keep) * f)
            V = Wh + U
            Z = V * _mask3(view, S_k, V)
            U = U + Wh - Z
            rho_next = rho * rho_growth ** ((k + 1) // rho_every)
            if rho_next != rho_k:
                U = U * (rho_k / rho_next)
        S = _mask3(view, sparse, Wh + U)
        Wn_hat = _least_squares(Wn, Hn, S, Wh, tol=cg_tol, max_iter=cg_iters,
                                B=None if C is None else Bn)  # fmt: skip
        out = Wn_hat / D.unsqueeze(1)
    if lv is not None:
        B = torch.bmm(W, H) if C is None else torch.bmm(W, C)
        out = _admm_quantize(B, H, S, out, lv, quant_iters, quant_rho, quant_rho_growth)
    return out, S


def _objective(H, B, Z) -> float:
    """``tr(Z H Zᵀ) − 2 tr(Z Bᵀ)``: with ``B = W H`` the layer error of ``Z`` less a
    constant, so the two rank candidates alike."""
    return float((torch.bmm(Z, H) * Z).sum() - 2 * (Z * B).sum())


def _admm_quantize(B, H, S, start, lv, iters: int, rho: float, growth: float):
    """ADMM on ``{Ŵ : Ŵ_S on the levels, Ŵ_¬S = 0}`` in the unscaled variables (objective
    ``tr(Ŵ H Ŵᵀ) − 2 tr(Ŵ Bᵀ)``), from the pruned solution ``start``; the final scale
    refitted in closed form for the chosen codes; the best of the nearest-level rounding and
    the ADMM iterates is kept."""
    inverses = _Inverses(H)
    rho0 = rho * float(torch.diagonal(H, dim1=1, dim2=2).mean())
    Z = _quantize_on(lv, start, S)
    best, best_obj = Z, _objective(H, B, Z)
    U = torch.zeros_like(start)
    for k in range(iters):
        Wh = _w_step(B, Z, U, rho0 * growth ** (k // 3), inverses)
        Z = _quantize_on(lv, Wh + U, S)
        U = U + Wh - Z
        if (k + 1) % 3 == 0:  # ρ grows: rescale the scaled dual
            U = U / growth
        obj = _objective(H, B, Z)
        if obj < best_obj:
            best, best_obj = Z, obj
    return _refit_scale(B, H, best)


def _refit_scale(B, H, Z):
    """``a·C`` with the codes ``C = Z / max|Z|`` fixed and ``a = tr(C Bᵀ)/tr(C H Cᵀ)``: the
    least-squares scale for those codes (the levels stay a scaled copy of the level set)."""
    top = float(Z.abs().max())
    if top == 0.0:
        return Z
    C = Z / top
    den = float((torch.bmm(C, H) * C).sum())
    a = float((C * B).sum()) / den if den > 0 else 0.0
    if not a > 0:
        return Z
    refit = a * C
    return refit if _objective(H, B, refit) <= _objective(H, B, Z) else Z


_SOLVE = {"admm": _admm, "sparsegpt": _sparsegpt, "wanda": _wanda, "magnitude": _magnitude}
_OPTIONS = {
    "admm": {"iters", "ramp", "rho", "rho_growth", "rho_every", "cg_tol", "cg_iters",
             "quant_iters", "quant_rho", "quant_rho_growth"},
    "sparsegpt": {"blocksize"},
    "wanda": set(),
    "magnitude": set(),
}  # fmt: skip


def _damped(g: _Gram, damp: float) -> torch.Tensor:
    """``H/n + damp·mean(diag)·I``; a dead input (``H_jj = 0``, its weights multiply zeros)
    gets the mean diagonal, so the factorizations stay regular at the Gram's own scale (a
    fixed value such as 1 would rank dead inputs above live ones after scaling)."""
    H = g.H / max(1, g.n)
    diag = torch.diagonal(H, dim1=1, dim2=2)
    dead = diag == 0
    live = (~dead).sum(1).clamp_min(1)
    mean = (diag.sum(1) / live).view(-1, 1)
    mean = torch.where(mean > 0, mean, torch.ones_like(mean))
    diag.copy_(torch.where(dead, mean, diag) + damp * mean)
    return H


# ---------------------------------------------------------------------------------------------
# the entry point


_MODES = {True: "sequential", "layers": "sequential by layer", False: "parallel"}


def _check_args(solver: str, damp: float, options: dict, sequential, dense_target) -> None:
    if sequential not in _MODES:
        raise ValueError(f"sequential={sequential!r}: use True, 'layers' or False.")
    if solver not in _SOLVE:
        raise ValueError(f"solver={solver!r}: use one of {', '.join(SOLVERS)}.")
    if dense_target and solver != "admm":
        raise ValueError(
            f"dense_target=True needs solver='admm' ({solver!r} solves the plain layer "
            "problem min ||XŴᵀ − XWᵀ||²)."
        )
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1e3:
        raise ValueError(f"damp={damp!r}: a positive number, e.g. 0.01 (of mean(diag H)).")
    unknown = set(options) - _OPTIONS[solver]
    if unknown:
        allowed = ", ".join(sorted(_OPTIONS[solver])) or "none"
        raise ValueError(
            f"solver {solver!r} has no option {sorted(unknown)[0]!r}; its options: {allowed}."
        )


def _batches(calibration) -> list:
    if torch.is_tensor(calibration) or isinstance(calibration, Mapping):
        return [calibration]  # one batch
    if not isinstance(calibration, Iterable):
        raise ValueError(
            f"calibration must be an iterable of model inputs (tensors, dicts or tuples), got "
            f"{type(calibration).__name__}."
        )
    batches = list(calibration)  # iterated once per block: an iterator must be kept
    if not batches:
        raise ValueError(
            "calibration is empty: give at least one batch of model inputs, e.g. a list of "
            "tensors or a DataLoader yielding inputs."
        )
    return batches


@torch.no_grad()
def oneshot(
    model: nn.Module,
    spec: Spec,
    calibration,
    *,
    solver: str = "admm",
    sequential: bool | str = True,
    damp: float = 0.01,
    default: Constraint | None = None,
    log=None,
    by_layer: bool | None = None,
    dense_target: bool = False,
    min_expert_tokens: int = 16,
    **solver_options,
) -> Masks:
    """Prune (and quantize) ``model`` in place, layer by layer, from calibration inputs.

    Args:
        model: a trained network; it runs in eval mode here (its mode is restored).
        spec: ``{name, glob or module type: constraint}`` as for :class:`admmprune.ADMM`; or
            one constraint for every Linear / ``Conv1D`` inside the model's blocks (a
            transformer's layers: never the embeddings or the output head).
        calibration: batches of model inputs: a tensor is passed as ``model(x)``, a dict as
            ``model(**x)``, a tuple as ``model(*x)`` (inputs only: no labels); a single tensor
            or dict is one batch.
        solver: ``"admm"``, ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
        sequential: ``True``: each block's statistics from the already-pruned layers before
            it; ``"layers"``: each transformer layer's from the pruned layers before it, every
            block inside it from one pass through the dense layer (llm-compressor's protocol;
            needs ``by_layer``); ``False``: every block's from the dense model.
        damp: ``H + damp·mean(diag H)·I``.
        default: constraint for every prunable weight the spec does not name.
        log: a function called with one summary line (e.g. ``print``).
        by_layer: sequential mode one block of an ``nn.ModuleList`` (a transformer's decoder
            layers) at a time: the calibration inputs run up to the first block once, and each
            block then runs on its cached inputs, so only one block's inputs and Grams are held
            (a model far deeper than memory's activation budget still prunes). ``None`` (the
            default): on whenever every constrained layer sits in one such list; the result
            equals the plain sequential mode's.
        dense_target: (``admm`` only) each layer fits the dense model's output on the dense
            model's inputs, ``min ||X̃Ŵᵀ − XWᵀ||²`` with ``X̃`` its inputs after the pruned
            layers before it (``B = W·X_dᵀX̃`` replaces ``W·H``): the error the earlier layers
            made is corrected where this layer can, at the cost of a dense copy of the model
            (one layer with ``by_layer``) and a second forward per calibration pass.
        min_expert_tokens: an expert of a fused mixture-of-experts weight (each expert is a
            layer of its own, its Gram from exactly the tokens routed to it) that the
            calibration routed fewer tokens than this is pruned by magnitude (too few rows
            to fit it to); no expert is left dense. ``masks.report.fallbacks`` lists them,
            and every expert's ``LayerReport`` its tokens and solver.
        solver_options: ``admm``: iters, ramp, rho, rho_growth, rho_every, cg_tol, cg_iters,
            quant_iters, quant_rho, quant_rho_growth; ``sparsegpt``: blocksize.

    Returns the :class:`Masks` of the constrained weights; ``masks.report`` is the
    :class:`OneShotReport`. On any error the model's weights are left as they were.
    """
    _check_args(solver, damp, solver_options, sequential, dense_target)
    if (
        isinstance(min_expert_tokens, bool)
        or not isinstance(min_expert_tokens, int)
        or min_expert_tokens < 0
    ):
        raise ValueError(f"min_expert_tokens={min_expert_tokens!r}: an integer ≥ 0, e.g. 16.")
    lists: list[str] = []
    if isinstance(spec, Constraint):
        spec, lists = _blocks_spec(model, spec)
    targets = select(model, spec, default)
    views = {}
    sets = {}
    for t in targets:
        for e in range(t.param.shape[0]) if t.experts else [None]:
            view = _View(t, e)
            sparse, lv = _split(t.constraint, t.name)
            if sparse is not None and e in (None, 0):
                sparse.check(torch.empty(view.shape, device="meta"), t.name, view.G)
            views[view.key] = view
            sets[view.name] = (t, sparse, lv)
    if dense_target and any(t.experts for t in targets):
        raise ValueError(
            "dense_target=True pairs each layer's input with the dense model's, but a router "
            "sends other tokens to an expert in the pruned model than in the dense one; leave "
            "the experts out of the spec, or use dense_target=False."
        )
    batches = _batches(calibration)
    device = next(iter(targets)).param.device
    report = OneShotReport(solver, sum(_count(b) for b in batches), len(batches), sequential,
                           float(damp))  # fmt: skip
    report.block_lists = lists
    start = time.perf_counter()
    originals = {t.name: t.param.detach().to("cpu", copy=True) for t in targets}
    training = model.training
    model.eval()
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(eager_experts(model))
        blocks, once, unseen = _discover(model, views, batches, device)
        if dense_target and not once:
            raise ValueError(
                "dense_target=True pairs each layer's input with the dense model's, so every "
                "constrained layer must run once per forward; this model calls one of them "
                "more than once."
            )
        found = _layer_list(model, targets) if sequential and by_layer is not False else None
        if (by_layer or sequential == "layers") and found is None:
            asked = "sequential='layers'" if sequential == "layers" else "by_layer=True"
            raise ValueError(
                f"{asked} needs every constrained layer inside one nn.ModuleList of identical "
                "blocks (a transformer's layers), with sequential on and by_layer not False."
            )
        supports = {}
        for view in unseen:  # no token reached it: nothing to fit, magnitude
            g = _Gram(view, device)
            supports[view.name] = _solve_layer(
                view, sets[view.name], _damped(g, damp), g, "magnitude", {}, report
            )

        def solve(stage, run, dense=None):
            grams = _collect(run, len(batches), stage, device, once and sequential, dense)
            report.gram_bytes_peak = max(
                report.gram_bytes_peak,
                sum(g.H.numel() * 4 * (1 if g.C is None else 2)
                    for g in {id(g): g for g in grams.values()}.values()),
            )  # fmt: skip
            for block in stage:
                g = grams[block[0].name]
                H = _damped(g, damp)
                options = solver_options
                if g.C is not None:  # damped like H, so a layer with X̃ = X is the plain problem
                    options = {**solver_options, "C": g.C / max(1, g.n) + (H - g.H / max(1, g.n))}
                few = block[0].expert is not None and g.n < min_expert_tokens
                for view in block:
                    supports[view.name] = _solve_layer(
                        view, sets[view.name], H, grams[view.name],
                        "magnitude" if few else solver, {} if few else options, report,
                    )  # fmt: skip

        if found is not None:
            report.by_layer = found[0]
            with _no_cache(model):
                inputs = _capture(model, found[1][0], batches, device)
                dense_inputs = inputs  # the first layer's inputs: nothing before it is pruned
                for j, layer in enumerate(found[1]):
                    mine = {id(m) for m in layer.modules()}
                    run = _block_runner(layer, inputs)
                    dense = None
                    if dense_target:
                        twin = copy.deepcopy(layer)
                        dense = (_block_runner(twin, dense_inputs), _twins(layer, twin))
                    inside = [b for b in blocks if id(b[0].module) in mine]
                    for stage in [inside] if sequential == "layers" else [[b] for b in inside]:
                        solve(stage, run, dense)
                    held = _bytes(inputs) + (_bytes(dense_inputs) if dense_target else 0)
                    report.activation_bytes_peak = max(report.activation_bytes_peak, held)
                    if j + 1 < len(found[1]):
                        if dense_target:
                            dense_inputs = _advance(twin, dense_inputs)
                        inputs = _advance(layer, inputs)
                del inputs, dense_inputs
        else:
            dense = None
            if dense_target:
                twin = copy.deepcopy(model)
                dense = (lambda i: _forward(twin, batches[i - 1], i, device), _twins(model, twin))
            stages = [[b] for b in blocks] if sequential else [blocks]
            for stage in stages:
                solve(stage, lambda i: _forward(model, batches[i - 1], i, device), dense)
    except BaseException:
        for t in targets:
            t.param.copy_(originals[t.name].to(t.param.device))
        raise
    finally:
        stack.close()
        model.train(training)
    report.seconds = time.perf_counter() - start
    masks = Masks(model, _assemble(targets, supports))
    masks.report = report
    if log is not None:
        log(report.summary())
    return masks


def _solve_layer(view, entry, H, gram, solver, options, report) -> torch.Tensor:
    """Solve one layer, write Ŵ into the model, record its report; returns its support."""
    t, sparse, lv = entry
    tic = time.perf_counter()
    W = view.w3(view.weight(t))
    x_norms = torch.diagonal(gram.H, dim1=1, dim2=2).sqrt()  # ||X_j||₂ per group
    start = W
    if solver in ("sparsegpt", "admm"):  # weights on dead inputs change no output: drop them
        start = W * (x_norms > 0).unsqueeze(1)
    W_hat, S = _SOLVE[solver](view, start, H, sparse, lv, x_norms=x_norms, **options)
    if not bool(torch.isfinite(W_hat).all()):
        raise ValueError(
            f"{t.name!r}: the {solver} solve produced NaN/Inf weights; raise damp (e.g. 0.1)."
        )
    H_sum = gram.H
    err = _error(H_sum, W_hat - W)
    ref = _error(H_sum, W)
    view.weight(t).copy_(view.param(W_hat).to(t.param.dtype))
    support = view.param(S)
    report.layers[view.name] = LayerReport(
        view.name, err, err / ref if ref > 0 else 0.0, float(S.float().mean()), gram.n,
        time.perf_counter() - tic, solver,
    )  # fmt: skip
    return support


def _assemble(targets: list[Target], supports: dict[str, torch.Tensor]) -> dict:
    """Per-parameter masks from per-layer supports (a fused experts weight's from its
    experts' slices)."""
    return {
        t.name: torch.stack([supports[f"{t.name}[{e}]"] for e in range(t.param.shape[0])])
        if t.experts
        else supports[t.name]
        for t in targets
    }
