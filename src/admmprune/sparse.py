"""Layers that compute only with what pruning left, for the sparsity compaction cannot remove.

- Non-structured: ``W`` (GEMM view, rows = filters) in ``torch.sparse`` CSR times the dense
  input: a Linear computes ``y = W x``, a Conv2d (``groups = 1``) ``W · unfold(x)`` (im2col).
  What ADMM-NN-S's storage/compute comparison measures against the compact dense model.
- 2:4 (N:M) sparsity on NVIDIA's sparse tensor cores: :func:`to_semi_structured` (CUDA).
- Column (shape) sparsity: a conv whose zero GEMM columns are whole input channels just reads
  fewer channels (``x[:, alive]`` into a smaller dense conv); otherwise it gathers the kept rows
  of ``unfold(x)`` and multiplies them with the kept columns of ``W`` (im2col + gather + a
  smaller GEMM).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

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


class ColumnConv2d(nn.Module):
    """A ``groups = 1`` Conv2d computing with its kept GEMM columns only.

    If every zero column belongs to an input channel whose columns are all zero, the layer is a
    smaller dense conv on the alive input channels; else ``y = W[:, K] · unfold(x)[K]``.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("ColumnConv2d takes groups=1, zero, numeric padding convs only.")
        W = conv.weight.detach()
        out, cin, kh, kw = W.shape
        cols = W.reshape(out, -1).ne(0).any(dim=0)
        alive = cols.view(cin, kh * kw).any(dim=1)
        self.by_channel = bool(torch.equal(cols.view(cin, -1), alive[:, None].expand(cin, kh * kw)))
        self.conv_args = (conv.stride, conv.padding, conv.dilation)
        self.kernel_size, self.out_channels = conv.kernel_size, out
        self.register_buffer("b", None if conv.bias is None else conv.bias.detach().clone())
        if self.by_channel:
            self.register_buffer("idx", alive.nonzero().flatten())
            self.register_buffer("W", W[:, alive].contiguous())
        else:
            self.register_buffer("idx", cols.nonzero().flatten())
            self.register_buffer("W", W.reshape(out, -1)[:, cols].contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride, padding, dilation = self.conv_args
        if self.by_channel:
            return nn.functional.conv2d(
                x.index_select(1, self.idx), self.W, self.b, stride, padding, dilation
            )
        B, _, H, Wd = x.shape
        cols = nn.functional.unfold(x, self.kernel_size, dilation, padding, stride)
        y = torch.matmul(self.W, cols.index_select(1, self.idx))  # [B, out, L]
        if self.b is not None:
            y = y + self.b.view(1, -1, 1)
        Ho = (H + 2 * padding[0] - dilation[0] * (self.kernel_size[0] - 1) - 1) // stride[0] + 1
        Wo = (Wd + 2 * padding[1] - dilation[1] * (self.kernel_size[1] - 1) - 1) // stride[1] + 1
        return y.view(B, self.out_channels, Ho, Wo)


@torch.no_grad()
def to_columns(model: nn.Module, min_pruned: float = 0.0) -> nn.Module:
    """A copy of ``model`` (eval mode) whose groups=1 Conv2d layers with more than
    ``min_pruned`` of their GEMM columns zero become :class:`ColumnConv2d`."""
    out = copy.deepcopy(model).eval()
    for name, m in list(out.named_modules()):
        if not isinstance(m, nn.Conv2d) or m.groups != 1 or isinstance(m.padding, str):
            continue
        cols = m.weight.reshape(m.weight.shape[0], -1).ne(0).any(dim=0)
        if float((~cols).float().mean()) <= min_pruned:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, attr, ColumnConv2d(m))
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
