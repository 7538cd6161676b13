"""Layers that compute only with what pruning left, for the sparsity compaction cannot remove.

- Non-structured: ``W`` (GEMM view, rows = filters) in ``torch.sparse`` CSR times the dense
  input: a Linear computes ``y = W x``, a Conv2d (``groups = 1``) ``W · unfold(x)`` (im2col).
  What ADMM-NN-S's storage/compute comparison measures against the compact dense model.
- 2:4 (N:M) sparsity on NVIDIA's sparse tensor cores: :func:`to_semi_structured` (CUDA).
- Column (shape) sparsity: :class:`ColumnConv2d` in the fastest of three exact forms, measured
  per layer by :func:`to_columns`: the dense conv, a smaller conv on the input channels that
  keep any column, or the kept columns grouped by kernel offset (a gather of the kept im2col
  columns from the padded input, then a GEMM with the kept weights, a few samples at a time).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn import functional

__all__ = [
    "ColumnConv2d",
    "SparseConv2d",
    "SparseLinear",
    "semi_structured_reason",
    "to_columns",
    "to_semi_structured",
    "to_sparse",
]


class SparseLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` in CSR."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("W", linear.weight.detach().to_sparse_csr())
        self.register_buffer("b", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.sparse.mm(self.W, x.reshape(-1, x.shape[-1]).t()).t()
        if self.b is not None:
            y = y + self.b
        return y.reshape(*lead, -1)


class SparseConv2d(nn.Module):
    """A ``groups = 1`` Conv2d as ``W_csr · im2col(x)``."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("SparseConv2d takes groups=1, zero, numeric padding convs only.")
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.register_buffer(
            "W", conv.weight.detach().reshape(conv.out_channels, -1).to_sparse_csr()
        )
        self.register_buffer("b", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, Wd = x.shape
        cols = nn.functional.unfold(
            x, self.kernel_size, self.dilation, self.padding, self.stride
        )  # B, CKK, L
        Ho = H + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1
        Wo = Wd + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1
        Ho, Wo = Ho // self.stride[0] + 1, Wo // self.stride[1] + 1
        L = cols.shape[-1]
        y = torch.sparse.mm(self.W, cols.transpose(0, 1).reshape(cols.shape[1], B * L))
        y = y.reshape(self.out_channels, B, L).transpose(0, 1)
        if self.b is not None:
            y = y + self.b.view(1, -1, 1)
        return y.reshape(B, self.out_channels, Ho, Wo)


@torch.no_grad()
def to_sparse(model: nn.Module, min_sparsity: float = 0.5) -> nn.Module:
    """A copy of ``model`` (eval mode) whose Linear and groups=1 Conv2d layers with at least
    ``min_sparsity`` zeros run on CSR kernels; the others stay dense."""
    out = copy.deepcopy(model).eval()
    with warnings.catch_warnings():  # torch's "sparse CSR is in beta": we chose it knowingly
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        _swap_sparse(out, min_sparsity)
    return out


def _swap_sparse(out: nn.Module, min_sparsity: float) -> None:
    for name, m in list(out.named_modules()):
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if float((m.weight == 0).float().mean()) < min_sparsity:
            continue
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or isinstance(m.padding, str)):
            continue
        new = SparseLinear(m) if isinstance(m, nn.Linear) else SparseConv2d(m)
        parent_name, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, attr, new)


_COLUMN_FORMS = ("dense", "channels", "offsets")


def _kept_columns(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The GEMM columns any filter keeps (``[cin/groups, kh, kw]``), the input channels that
    keep any, and whether the zero columns are whole channels."""
    kept = W.ne(0).any(dim=0)
    alive = kept.flatten(1).any(dim=1)
    return kept, alive, bool(torch.equal(kept, alive[:, None, None].expand_as(kept)))


class ColumnConv2d(nn.Module):
    """A Conv2d whose GEMM columns (input channel ``c``, kernel offset ``(i, j)``) are partly
    zero (shape-wise sparsity), computed in one of three exact forms:

    - ``"dense"``: the conv itself, zeros multiplied;
    - ``"channels"``: a smaller dense conv on the input channels that keep any column (their
      zero columns stay inside as zeros);
    - ``"offsets"``: the kept columns grouped by kernel offset, ``C_ij`` the channels kept at
      ``(i, j)``::

          y = b + Σ_(i,j) W[:, C_ij, i, j] ⋆₁ₓ₁ x̃[:, C_ij, i·d_h + s_h·p, j·d_w + s_w·q]

      (``x̃`` zero-padded): a gather (flat indices into ``x̃``, cached per input size) builds
      only the kept columns of the im2col matrix, and a GEMM with the kept weights does exactly
      the kept MACs. On CPU with ``groups = 1`` both run on a few samples at a time
      (``tile_bytes`` of columns per tile, padded in channels-last order), and each tile's
      GEMM writes its rows of the output in place: a whole batch of columns is several times
      the input, and allocating it fresh and streaming it through memory cost more than the
      gather. Elsewhere (grouped convs, CUDA, and traced or compiled models, where the batch
      is symbolic) the whole batch is gathered at once and one 1×1 conv that keeps
      ``groups`` runs; the columns are ordered group by group, since groups share them.

    :func:`to_columns` picks the fastest form per layer by measurement.
    """

    #: bytes of gathered columns per tile of the ``groups = 1`` offsets form: 8 MiB was the
    #: fastest of 1–16 MiB on ResNet-56's and VGG-16's layers at batch 64 (2-thread Xeon, 2 MiB
    #: L2 per core; ``benchmarks/column_forms.py --tile-mib``); 16 MiB lost on 64 channels at 32×32
    tile_bytes = 2**23

    def __init__(self, conv: nn.Conv2d, form: str | None = None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("ColumnConv2d takes convs with zero, numeric padding only.")
        W = conv.weight.detach()
        out, cin_g, kh, kw = W.shape
        g = conv.groups
        kept, alive, self.by_channel = _kept_columns(W)
        if form is None:
            form = "channels" if self.by_channel else "offsets"
        if form not in _COLUMN_FORMS:
            raise ValueError(f"form={form!r}: one of {', '.join(_COLUMN_FORMS)}.")
        self.form = form
        self.conv_args = (conv.stride, conv.padding, conv.dilation, g)
        self.kernel_size, self.out_channels = conv.kernel_size, out
        self.timings: dict[str, float] = {}  # ms per form, when to_columns measured them
        self.register_buffer("b", None if conv.bias is None else conv.bias.detach().clone())
        base = torch.arange(g).mul(cin_g)[:, None]  # group-major global channel indices

        def channels(local: torch.Tensor) -> torch.Tensor:
            return (base + local[None]).flatten()

        self._flat: dict[tuple, torch.Tensor] = {}  # gather indices per input size (eager)
        if form == "dense":
            self.register_buffer("idx", None)
            self.register_buffer("W", W.clone())
        elif form == "channels":
            local = alive.nonzero().flatten()
            self.register_buffer("idx", channels(local))
            self.register_buffer("W", W[:, local].contiguous())
        else:
            # the kept columns offset by offset; per column its channel and kernel row / column
            cols = [(c, i, j) for i in range(kh) for j in range(kw)
                    for c in kept[:, i, j].nonzero().flatten().tolist()]  # fmt: skip
            c, i, j = (torch.tensor(v, dtype=torch.long) for v in zip(*cols)) if cols else (
                torch.zeros(0, dtype=torch.long),) * 3  # fmt: skip
            self.register_buffer("idx", channels(c))  # group-major, as W's columns per group
            self.register_buffer("di", i.repeat(g))
            self.register_buffer("dj", j.repeat(g))
            Wk = W[:, c, i, j] if cols else W.new_zeros(out, 1)
            self.register_buffer("W", Wk[:, :, None, None].contiguous())

    def extra_repr(self) -> str:
        return f"{self.out_channels}, kernel_size={self.kernel_size}, form={self.form!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride, padding, dilation, groups = self.conv_args
        if self.form == "dense":
            return functional.conv2d(x, self.W, self.b, stride, padding, dilation, groups)
        if self.form == "channels":
            return functional.conv2d(
                x.index_select(1, self.idx), self.W, self.b, stride, padding, dilation, groups
            )
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, stride, dilation
        N, _, H, Wd = x.shape
        Ho = (H + 2 * padding[0] - dh * (kh - 1) - 1) // sh + 1
        Wo = (Wd + 2 * padding[1] - dw * (kw - 1) - 1) // sw + 1
        if self.idx.numel() == 0:  # every column pruned: only the bias is left
            y = x.new_zeros(N, self.out_channels, Ho, Wo)
            return y if self.b is None else y + self.b.view(1, -1, 1, 1)
        tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if groups == 1 and not tracing and x.device.type == "cpu":
            return self._tiled(x, Ho, Wo)
        xp = functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
        nhwc = xp.is_contiguous(memory_format=torch.channels_last)
        flat = self._gather_index(xp.shape[1:], Ho, Wo, nhwc)
        if nhwc:  # gather in NHWC: the result is the 1×1 conv's channels-last input as is
            cols = xp.permute(0, 2, 3, 1).reshape(N, -1).index_select(1, flat)
            cols = cols.view(N, Ho, Wo, -1).permute(0, 3, 1, 2)
        else:
            cols = xp.reshape(N, -1).index_select(1, flat).view(N, -1, Ho, Wo)
        return functional.conv2d(cols, self.W, self.b, groups=groups)

    def _tiled(self, x: torch.Tensor, Ho: int, Wo: int) -> torch.Tensor:
        """The ``groups = 1`` offsets form tile by tile: pad a few samples (channels-last),
        gather their kept columns, and ``y_tile = cols · Wₖᵀ + b`` into the output."""
        _, (ph, pw), _, _ = self.conv_args
        N, C, H, Wd = x.shape
        Hp, Wp, K = H + 2 * ph, Wd + 2 * pw, self.W.shape[1]
        Wk = self.W.view(self.out_channels, K)
        flat = self._gather_index(torch.Size((C, Hp, Wp)), Ho, Wo, True, int32=True)
        x_nhwc = x.permute(0, 2, 3, 1)  # a view; the tiles are copied channels-last either way
        y = x.new_empty(N, Ho, Wo, self.out_channels)
        n = max(1, min(N, self.tile_bytes // max(1, Ho * Wo * K * x.element_size())))
        for s in range(0, N, n):
            m = min(n, N - s)
            xp = x.new_empty(m, Hp, Wp, C)  # zero only the border: the interior is copied
            xp[:, :ph].zero_()
            xp[:, Hp - ph :].zero_()
            xp[:, ph : Hp - ph, :pw].zero_()
            xp[:, ph : Hp - ph, Wp - pw :].zero_()
            xp[:, ph : Hp - ph, pw : Wp - pw].copy_(x_nhwc[s : s + m])
            cols = xp.view(m, -1).index_select(1, flat).view(-1, K)
            out = y[s : s + m].view(-1, self.out_channels)
            torch.mm(cols, Wk.t(), out=out)
            if self.b is not None:  # while the tile is in cache (addmm copies b in first)
                out.add_(self.b)
        y = y.permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()

    def _gather_index(
        self, padded: torch.Size, Ho: int, Wo: int, nhwc: bool, int32: bool = False
    ) -> torch.Tensor:
        """Flat indices into one padded sample of every kept column at every output position:
        ``x̃[c, i·d_h + s_h·p, j·d_w + s_w·q]``, ordered ``[column, p, q]`` (NCHW) or
        ``[p, q, column]`` (NHWC); ``int32`` where a sample fits (half the index traffic)."""
        key = (tuple(padded), Ho, Wo, nhwc, int32, self.idx.device)
        tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
        if not tracing and key in self._flat:
            return self._flat[key]
        C, Hp, Wp = padded
        (sh, sw), _, (dh, dw), _ = self.conv_args
        rows = self.di[:, None] * dh + sh * torch.arange(Ho, device=self.idx.device)  # [K, Ho]
        cols = self.dj[:, None] * dw + sw * torch.arange(Wo, device=self.idx.device)  # [K, Wo]
        if nhwc:
            flat = (rows.T[:, None, :] * Wp + cols.T[None, :, :]) * C + self.idx
        else:
            flat = (self.idx[:, None, None] * Hp + rows[:, :, None]) * Wp + cols[:, None, :]
        flat = flat.flatten()
        if int32 and padded.numel() < 2**31:
            flat = flat.int()
        if not tracing:
            self._flat[key] = flat
        return flat


def _column_candidate(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
        and bool(m.weight.eq(0).any())
    )


# measured choices: (geometry, kept pattern sizes, input shape, layout, threads) -> form; a
# form replaces dense only when it is faster by more than the noise of a few paired runs
_MARGIN = 0.95
_FORM_CACHE: dict[tuple, tuple[str, dict[str, float]]] = {}


def _time_forms(conv: nn.Conv2d, x: torch.Tensor, rounds: int) -> tuple[str, dict[str, float]]:
    from .latency import measure_paired

    kept, alive, by_channel = _kept_columns(conv.weight.detach())
    forms = ["dense"]
    if not bool(alive.all()):  # with every channel alive "channels" is "dense" plus a gather
        forms.append("channels")
    if not by_channel:  # an exact smaller conv: "offsets" cannot do fewer MACs
        forms.append("offsets")
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
    key = (
        tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, conv.groups,
        int(alive.sum()), tuple(kept.sum(dim=0).flatten().tolist()),  # kept channels per (i, j)
        tuple(x.shape), x.dtype, str(x.device), layout is not None, torch.get_num_threads(),
    )  # fmt: skip
    if key not in _FORM_CACHE:
        fmt = layout or torch.preserve_format
        candidates = {f: ColumnConv2d(conv, f).to(x.device, memory_format=fmt) for f in forms}
        ms = measure_paired(candidates, torch.randn_like(x), rounds)
        best = min(ms, key=ms.get)
        if ms[best] > _MARGIN * ms["dense"]:  # within timing noise of dense: keep dense
            best = "dense"
        _FORM_CACHE[key] = (best, ms)
    return _FORM_CACHE[key]


@torch.no_grad()
def to_columns(
    model: nn.Module,
    example: torch.Tensor | None = None,
    *,
    min_pruned: float = 0.0,
    rounds: int = 7,
) -> nn.Module:
    """A copy of ``model`` (eval mode) whose Conv2d layers with more than ``min_pruned`` of
    their weights zero become :class:`ColumnConv2d`.

    With ``example`` (a batch as it will be served: its batch size, dtype, device and memory
    format), each layer runs every form on its own input shape, timed in alternation
    (``rounds`` paired runs), and keeps the fastest if it beats the dense conv by more than
    5 % (else dense: a choice inside timing noise would make some layers slower);
    the choice is cached per layer shape and kept pattern in this process. ``layer.form`` is
    the choice, ``layer.timings`` the milliseconds per form. Without ``example`` the form is
    fixed: ``"channels"`` when the zero columns are whole input channels, else
    ``"offsets"``. BatchNorm is not folded here: fold it first (e.g. ``torch.fx``'s ``fuse``).
    """
    if example is not None and not torch.is_tensor(example):
        raise TypeError(
            f"to_columns(model, example): example must be an input batch (a tensor), got "
            f"{type(example).__name__}; pass min_pruned= by name."
        )
    out = copy.deepcopy(model).eval()
    convs = {
        name: m for name, m in out.named_modules()
        if _column_candidate(m) and float(m.weight.eq(0).float().mean()) > min_pruned
    }  # fmt: skip
    inputs: dict[str, torch.Tensor] = {}
    if example is not None:
        handles = [
            m.register_forward_pre_hook(lambda _m, a, n=n: inputs.setdefault(n, a[0]))
            for n, m in convs.items()
        ]
        try:
            out(example)
        finally:
            for h in handles:
                h.remove()
    for name, m in convs.items():
        if name in inputs:
            form, ms = _time_forms(m, inputs[name], rounds)
            new = ColumnConv2d(m, form)
            new.timings = dict(ms)
        else:
            new = ColumnConv2d(m)
        new = new.to(m.weight.device)
        parent_name, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, attr, new)
    return out


# 2:4 on sparse tensor cores -------------------------------------------------------------------
# the CUTLASS kernels' rules (torch.sparse.SparseSemiStructuredTensorCUTLASS), which also satisfy
# cuSPARSELt's: weight rows a multiple of 32, columns a multiple of 64 (fp16 / bf16)
_SEMI_ROWS, _SEMI_COLS = 32, 64


def semi_structured_reason(weight: torch.Tensor) -> str | None:
    """Why a Linear weight cannot run on the 2:4 sparse kernels, or ``None`` if it can: fp16 /
    bf16, rows a multiple of 32, columns a multiple of 64, at most 2 non-zeros in every 4
    consecutive inputs of a row."""
    if weight.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {weight.dtype} (the kernels take float16 / bfloat16: model.half() first)"
    rows, cols = weight.shape
    if rows % _SEMI_ROWS or cols % _SEMI_COLS:
        return (
            f"shape {rows}x{cols} (rows must be a multiple of {_SEMI_ROWS}, inputs of {_SEMI_COLS})"
        )
    per_four = weight.detach().reshape(rows, cols // 4, 4).ne(0).sum(-1)
    if int(per_four.max()) > 2:
        return "not 2:4 sparse (prune it with NM(2, 4) first)"
    return None


def to_semi_structured(model: nn.Module) -> dict[str, str]:
    """Make, in place, every 2:4-sparse ``nn.Linear`` compute with
    ``torch.sparse.to_sparse_semi_structured`` (NVIDIA sparse tensor cores, CUDA only).

    Returns ``{layer name: why it stayed dense}`` for every Linear that was left dense (wrong
    dtype, shape or pattern: :func:`semi_structured_reason`). The converted weights are frozen
    (the kernels are for inference).
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "to_semi_structured needs a CUDA GPU with sparse tensor cores (Ampere or newer); "
            "none is available here. The 2:4 masks still apply on CPU as ordinary zeros."
        )
    from torch.sparse import to_sparse_semi_structured

    dense = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if m.weight.device.type != "cuda":
            dense[name] = f"on {m.weight.device} (move the model to CUDA first)"
            continue
        why = semi_structured_reason(m.weight)
        if why:
            dense[name] = why
            continue
        try:
            m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()), False)
        except RuntimeError as e:  # a kernel the GPU or build lacks
            dense[name] = f"refused by torch: {e}"
    return dense
