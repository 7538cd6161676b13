r"""One-shot (post-training) pruning and quantization from calibration data, layer by layer.

For each constrained layer with weight ``W`` (GEMM view: rows = outputs, columns = the input
features; for a conv, the unfolded patches) and calibration inputs ``X`` (rows = samples /
positions), solve, with no retraining::

    min_Ŵ ||X Ŵᵀ − X Wᵀ||²_F = tr((Ŵ − W) H (Ŵ − W)ᵀ),   H = XᵀX   s.t.  Ŵ ∈ S

``H`` is accumulated in fp32 by forward hooks over the calibration batches (``X`` is never
held whole) and damped: ``H + damp·mean(diag H)·I``. Every set of :mod:`admmprune.sets.constraints`
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
import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ...sets.constraints import Constraint
from ...weights.experts import eager_experts
from ...weights.forward import no_cache as _no_cache
from ...weights.masks import Masks
from ...weights.select import Spec, Target, select
from .blocks import _advance, _block_runner, _blocks_spec, _bytes, _capture, _layer_list, _twins
from .capture import _collect, _count, _discover, _forward, _Gram, _View
from .layer_solvers import _OPTIONS, _SOLVE, SOLVERS, _damped, _error, _split
from .report import _MODES, LayerReport, OneShotReport

__all__ = ["SOLVERS", "oneshot"]


# ---------------------------------------------------------------------------------------------
# the entry point


def _check_args(
    solver: str, damp: float, options: dict, sequential, dense_target, min_expert_tokens
) -> None:
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
    if (
        isinstance(min_expert_tokens, bool)
        or not isinstance(min_expert_tokens, int)
        or min_expert_tokens < 0
    ):
        raise ValueError(f"min_expert_tokens={min_expert_tokens!r}: an integer ≥ 0, e.g. 16.")


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
    _check_args(solver, damp, solver_options, sequential, dense_target, min_expert_tokens)
    lists: list[str] = []
    if isinstance(spec, Constraint):
        spec, lists = _blocks_spec(model, spec)
    targets = select(model, spec, default)
    views, sets = _views(targets, dense_target)
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
        solve = _Solve(sets, report, solver, solver_options, damp, min_expert_tokens,
                       len(batches), device, once and sequential)  # fmt: skip
        for view in unseen:  # no token reached it: nothing to fit, magnitude
            g = _Gram(view, device)
            solve.supports[view.name] = _solve_layer(
                view, sets[view.name], _damped(g, damp), g, "magnitude", {}, report
            )
        if found is not None:
            report.by_layer = found[0]
            with _no_cache(model):
                _by_layer(model, found[1], blocks, batches, device, solve, sequential, dense_target)
        else:
            _whole_model(model, blocks, batches, device, solve, sequential, dense_target)
    except BaseException:
        for t in targets:
            t.param.copy_(originals[t.name].to(t.param.device))
        raise
    finally:
        stack.close()
        model.train(training)
    report.seconds = time.perf_counter() - start
    masks = Masks(model, _assemble(targets, solve.supports))
    masks.report = report
    if log is not None:
        log(report.summary())
    return masks


def check(model: nn.Module, spec, default: Constraint | None = None, dense_target=False) -> None:
    """Raise ``ValueError`` for a spec one-shot pruning cannot solve (a Filters set, two
    quantization sets, a weight no GEMM view fits), before any forward: what a recipe checks
    before it writes anything."""
    if isinstance(spec, Constraint):
        spec, _ = _blocks_spec(model, spec)
    _views(select(model, spec, default), dense_target)


def _views(targets: list[Target], dense_target: bool) -> tuple[dict, dict]:
    """Each constrained layer's GEMM view (one per expert of a fused experts weight) by key,
    and ``{view name: (target, sparse set, levels)}``; every set checked on its view's shape."""
    views, sets = {}, {}
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
    return views, sets


class _Solve:
    """Solves one stage of blocks: collects their Grams from ``run`` (and the dense twin's
    cross Gram for ``dense_target``), then each layer of each block; ``supports`` gathers
    every layer's support."""

    def __init__(self, sets, report, solver, options, damp, min_expert_tokens, n_batches,
                 device, stop_early) -> None:  # fmt: skip
        self.sets, self.report, self.solver, self.options = sets, report, solver, options
        self.damp, self.min_expert_tokens = damp, min_expert_tokens
        self.n_batches, self.device, self.stop_early = n_batches, device, stop_early
        self.supports: dict[str, torch.Tensor] = {}

    def __call__(self, stage, run, dense=None) -> None:
        grams = _collect(run, self.n_batches, stage, self.device, self.stop_early, dense)
        report = self.report
        report.gram_bytes_peak = max(
            report.gram_bytes_peak,
            sum(g.H.numel() * 4 * (1 if g.C is None else 2)
                for g in {id(g): g for g in grams.values()}.values()),
        )  # fmt: skip
        for block in stage:
            g = grams[block[0].name]
            H = _damped(g, self.damp)
            options = self.options
            if g.C is not None:  # damped like H, so a layer with X̃ = X is the plain problem
                options = {**options, "C": g.C / max(1, g.n) + (H - g.H / max(1, g.n))}
            few = block[0].expert is not None and g.n < self.min_expert_tokens
            for view in block:
                self.supports[view.name] = _solve_layer(
                    view, self.sets[view.name], H, grams[view.name],
                    "magnitude" if few else self.solver, {} if few else options, report,
                )  # fmt: skip


def _by_layer(model, layers, blocks, batches, device, solve: _Solve, sequential, dense_target):
    """One block of the layer list at a time, each from its cached inputs (``by_layer``)."""
    inputs = _capture(model, layers[0], batches, device)
    dense_inputs = inputs  # the first layer's inputs: nothing before it is pruned
    for j, layer in enumerate(layers):
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
        solve.report.activation_bytes_peak = max(solve.report.activation_bytes_peak, held)
        if j + 1 < len(layers):
            if dense_target:
                dense_inputs = _advance(twin, dense_inputs)
            inputs = _advance(layer, inputs)


def _whole_model(model, blocks, batches, device, solve: _Solve, sequential, dense_target):
    """Every stage from forwards of the whole model (sequential: one block per stage)."""
    dense = None
    if dense_target:
        twin = copy.deepcopy(model)
        dense = (lambda i: _forward(twin, batches[i - 1], i, device), _twins(model, twin))
    stages = [[b] for b in blocks] if sequential else [blocks]
    for stage in stages:
        solve(stage, lambda i: _forward(model, batches[i - 1], i, device), dense)


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
