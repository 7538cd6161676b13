"""Storage bits per weight in every sparse format (dense, relative indices, CSR, structured,
hybrid, N:M, codebooks), each on the layer's GEMM view: what the packed file writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..weights.gemm import expert_layouts, gemm_view, layer_weights, transposed_weights

__all__ = ["storage", "weight_storage"]

# Storage ---------------------------------------------------------------------------------------
#
# Bits to store one Conv/Linear weight W (n entries, GEMM view rows × cols, nnz non-zeros):
#
#   values      raw (the dtype's bits per value), or codes of c = ceil(log2 #distinct) bits into a
#               codebook of the distinct values (#distinct · dtype bits), whichever is smaller;
#               quantized weights have few distinct values, so c is their bit width
#   dense       n · c + codebook
#   relative    (nnz + fillers) · (c + b) + codebook: each entry stores its gap to the previous
#               non-zero (1 … 2^b) in b bits; a longer gap takes filler zeros, one per 2^b
#               positions skipped; b minimises the total (ADMM-NN-S's relative indexing)
#   csr         nnz · (c + ceil(log2 cols)) + (rows + 1) · ceil(log2(nnz + 1)) + codebook
#   structured  the dense block of kept rows × kept columns · c + rows + cols (bitmaps of the
#               kept ones) + codebook
#   hybrid      rows + cols (the same bitmaps) + the kept block in relative format: pruning
#               leaves whole rows and columns empty (a pruned filter, the inputs of a pruned
#               channel), and gaps inside the smaller block are shorter, so b shrinks
#   nm          N:M (every m consecutive GEMM columns hold at most n non-zeros, m in 4/8/16):
#               rows · cols/m · n entries of c + log2(m) bits + codebook (2:4: 2 index bits
#               per kept weight, the layout sparse tensor cores read)
#
# Every other tensor (biases, BatchNorm, buffers) is stored raw. The packed file of
# :mod:`admmprune.deployment.compressed` writes each weight in its smallest format of dense,
# relative, structured and hybrid, with exactly these payload sizes.


def _bits_for(count: int) -> int:
    """Bits of a code that tells ``count`` values apart (at least 1)."""
    return max(1, math.ceil(math.log2(count))) if count > 1 else 1


@dataclass
class ValueCode:
    """How the values of a tensor are coded: raw, or ``bits``-bit codes into ``codebook``."""

    raw_bits: int  # bits per raw value of the dtype
    codebook: torch.Tensor | None  # sorted distinct values, or None for raw values

    @property
    def bits(self) -> int:
        return self.raw_bits if self.codebook is None else _bits_for(self.codebook.numel())

    @property
    def table_bits(self) -> int:
        return 0 if self.codebook is None else self.codebook.numel() * self.raw_bits


def value_code(
    values: torch.Tensor,
    raw_bits: int,
    with_zero: bool = False,
    distinct: torch.Tensor | None = None,
) -> ValueCode:
    """The cheaper of raw values and a codebook for ``values`` (plus 0 when ``with_zero``);
    ``distinct``: ``values.unique()`` when the caller has it (a sort of every value)."""
    distinct = values.unique() if distinct is None else distinct
    if with_zero and not bool((distinct == 0).any()):
        distinct = torch.cat([distinct, distinct.new_zeros(1)]).sort().values
    book = ValueCode(raw_bits, distinct)
    if (
        distinct.numel()
        and book.bits * values.numel() + book.table_bits < raw_bits * values.numel()
    ):
        return book
    return ValueCode(raw_bits, None)


def relative_gaps(W: torch.Tensor) -> torch.Tensor:
    """Gaps between consecutive non-zeros of the flattened ``W`` (the first from position −1)."""
    pos = W.detach().flatten().nonzero().flatten()
    return torch.diff(pos, prepend=pos.new_full((1,), -1))


def fillers(gaps: torch.Tensor, b: int) -> int:
    """Filler zeros that relative indices of ``b`` bits need for these gaps."""
    return int(((gaps - 1) >> b).sum()) if gaps.numel() else 0


def _gemm(W: torch.Tensor) -> torch.Tensor:
    return W.detach().reshape(W.shape[0], -1) if W.ndim >= 2 else W.detach().reshape(1, -1)


def _log2_binomial(n: int, k: int) -> float:
    """log2 C(n, k): the information in which k of n positions are non-zero."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def _relative(flat: torch.Tensor, raw: int, distinct: torch.Tensor | None = None) -> dict:
    """The relative format of the 1-D ``flat`` with the ``b`` that minimises its bits
    (``distinct``: its distinct non-zero values, when known)."""
    gaps = relative_gaps(flat)
    nz = flat[flat != 0]
    distinct = nz.unique() if distinct is None else distinct
    codes: dict[bool, ValueCode] = {}  # by "fillers need a 0": the same values at every b
    best = None
    for b in range(1, max(2, math.ceil(math.log2(flat.numel() + 1))) + 1):
        f = fillers(gaps, b)
        zero = f > 0
        if zero not in codes:
            codes[zero] = value_code(nz, raw, with_zero=zero, distinct=distinct)
        code = codes[zero]
        entries = nz.numel() + f
        bits = entries * (code.bits + b) + code.table_bits
        if best is None or bits < best["bits"]:
            best = {
                "bits": bits,
                "value_bits": entries * code.bits,
                "index_bits": entries * b,
                "codebook_bits": code.table_bits,
                "b": b,
                "fillers": f,
            }
    return best


#: group sizes the N:M format is tried with (powers of two: an index is exactly log2 m bits)
NM_GROUPS = (4, 8, 16)


def nm_layout(W: torch.Tensor) -> tuple[int, int] | None:
    """The ``(n, m)`` of the N:M format that stores ``W`` in the fewest entries (every group
    of ``m`` consecutive GEMM columns holding at most ``n`` non-zeros), or None if none saves
    anything."""
    M = _gemm(W)
    best = None
    for m in NM_GROUPS:
        if M.shape[1] % m:
            continue
        n = int(M.reshape(-1, m).ne(0).sum(1).max()) if M.numel() else 0
        if 0 < n < m and (best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return best


def _nm(W: torch.Tensor, raw: int) -> dict | None:
    """N:M format: ``n`` entries per group of ``m``, each a value code and a ``log2 m``-bit
    position in its group (2:4: 2 bits per kept weight); a group with fewer non-zeros pads
    with zeros."""
    layout = nm_layout(W)
    if layout is None:
        return None
    n, m = layout
    G = _gemm(W).reshape(-1, m)
    entries = G.shape[0] * n
    nz = G[G != 0]
    code = value_code(nz, raw, with_zero=entries > nz.numel())
    b = _bits_for(m)
    return {
        "bits": entries * (code.bits + b) + code.table_bits,
        "value_bits": entries * code.bits,
        "index_bits": entries * b,
        "codebook_bits": code.table_bits,
        "n": n,
        "m": m,
    }


# the formats a weight may be stored in (csr is counted for comparison, never chosen)
FORMATS = ("dense", "relative", "structured", "hybrid", "nm")


def weight_storage(W: torch.Tensor) -> dict:
    """Bits of ``W`` in every format (see above), the best one, and its split into value bits,
    index bits and codebook bits."""
    raw = W.element_size() * 8
    M = _gemm(W)
    rows, cols = M.shape
    n = W.numel()
    nz = W.detach().flatten()[W.detach().flatten() != 0]
    nnz = nz.numel()
    out: dict = {"n": n, "nnz": nnz, "dense_raw": n * raw}

    # one sort of the values serves every format: the non-zeros' distinct values are the
    # dense ones without 0 (a unique per format was most of a large layer's time)
    everything = W.detach().flatten().unique()
    distinct = everything[everything != 0]
    dense_code = value_code(W.detach().flatten(), raw, distinct=everything)
    out["dense"] = {
        "bits": n * dense_code.bits + dense_code.table_bits,
        "value_bits": n * dense_code.bits,
        "index_bits": 0,
        "codebook_bits": dense_code.table_bits,
    }

    out["relative"] = _relative(W.detach().flatten(), raw, distinct)

    nz_code = value_code(nz, raw, distinct=distinct)
    col_bits, ptr_bits = _bits_for(cols), _bits_for(nnz + 1)
    out["csr"] = {
        "bits": nnz * (nz_code.bits + col_bits) + (rows + 1) * ptr_bits + nz_code.table_bits,
        "value_bits": nnz * nz_code.bits,
        "index_bits": nnz * col_bits + (rows + 1) * ptr_bits,
        "codebook_bits": nz_code.table_bits,
    }

    keep_r, keep_c = M.ne(0).any(dim=1), M.ne(0).any(dim=0)
    block = M[keep_r][:, keep_c]
    block_code = value_code(block.flatten(), raw, with_zero=block.numel() > nnz, distinct=distinct)
    out["structured"] = {
        "bits": block.numel() * block_code.bits + rows + cols + block_code.table_bits,
        "value_bits": block.numel() * block_code.bits,
        "index_bits": rows + cols,
        "codebook_bits": block_code.table_bits,
        "rows": int(keep_r.sum()),
        "cols": int(keep_c.sum()),
    }
    inner = _relative(block.flatten(), raw, distinct)
    out["hybrid"] = {
        **inner,
        "bits": inner["bits"] + rows + cols,
        "index_bits": inner["index_bits"] + rows + cols,
        "rows": out["structured"]["rows"],
        "cols": out["structured"]["cols"],
    }
    out["nm"] = _nm(W, raw)  # None when no N:M layout saves anything
    # no format that can code every support of nnz among n positions needs fewer index bits
    out["index_bound_bits"] = _log2_binomial(n, nnz)
    out["format"] = min((f for f in FORMATS if out[f] is not None), key=lambda f: out[f]["bits"])
    out["bits"] = out[out["format"]]["bits"]
    return out


@torch.no_grad()
def storage(model: nn.Module) -> dict:
    """Storage in bits of every tensor of ``model.state_dict()``.

    Returns ``{"layers": {weight name: weight_storage(W)}, "other_bits", "weights_raw",
    "weights_bits", "weights_value_bits", "weights_index_bits", "index_bound_bits", "total_raw",
    "total_bits"}``: Conv/Linear weights in their best format (``weights_value_bits`` leaves the
    index and codebook out, the way the papers count), everything else raw.
    ``index_bound_bits`` sums log2 C(n, nnz) per weight: the fewest index bits any format able to
    code every support could spend (a structured support can be coded in fewer, because it is
    not an arbitrary one). ``total_raw / total_bits`` is the compression rate.
    """
    weights, transposed = layer_weights(model), transposed_weights(model)
    experts = expert_layouts(model)
    layers, other = {}, 0
    for name, t in model.state_dict().items():
        if name in weights:
            flip = experts.get(name, name in transposed)
            layers[name] = weight_storage(gemm_view(t, flip, name in experts))
        else:
            other += t.numel() * t.element_size() * 8
    weights_raw = sum(s["dense_raw"] for s in layers.values())
    weights_bits = sum(s["bits"] for s in layers.values())
    return {
        "layers": layers,
        "other_bits": other,
        "weights_raw": weights_raw,
        "weights_bits": weights_bits,
        "weights_value_bits": sum(s[s["format"]]["value_bits"] for s in layers.values()),
        "weights_index_bits": sum(s[s["format"]]["index_bits"] for s in layers.values()),
        "index_bound_bits": sum(s["index_bound_bits"] for s in layers.values()),
        "total_raw": weights_raw + other,
        "total_bits": weights_bits + other,
    }
