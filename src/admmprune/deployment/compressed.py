"""The packed file of a pruned (and quantized) model: what the storage accounting counts, on disk.

Layout (little-endian)::

    b"ADMMPRN" + version byte        8 bytes
    header length                    uint32
    header                           zlib-compressed JSON: the model to build (optional) and,
                                     per state_dict tensor, its dtype, shape, format and sizes
    payload                          each tensor's sections, each padded to a whole byte
    CRC-32                           uint32, of everything before it (version 3 on)

A weight stored ``[in, out]`` (transformers' ``Conv1D``) is written as its transpose, the GEMM
view the formats are defined on (so 2:4 along its inputs is N:M), and listed in the header's
``"transposed"`` (version 5 on); it is read back in its own layout.

Every Conv/Linear weight is written in the smallest of the formats of
:func:`admmprune.deployment.storage.weight_storage` (dense codes, relative indices with fillers, the
structured block with row/column bitmaps, or hybrid: those bitmaps with the block in relative
format), values as codes into a codebook of its distinct values when that is smaller; every other
tensor raw. Nothing is pickled and nothing in the file is executed: the model is built from a
built-in name, or given by the caller.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._io import atomic_write_bytes
from ..weights.gemm import layer_weights, transposed_weights
from .storage import (
    ValueCode,
    _bits_for,
    _gemm,
    nm_layout,
    relative_gaps,
    value_code,
    weight_storage,
)

__all__ = ["export_compressed", "load_compressed"]

MAGIC = b"ADMMPRN"
# 2 added the hybrid format, 3 the CRC-32, 4 the N:M format, 5 Conv1D weights in their GEMM
# orientation (header "transposed"); older files read
VERSION = 5
_READS = (1, 2, 3, 4, 5)
_CRC = 4  # bytes of the trailing CRC-32 (version 3 on)
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8)
}


# bit packing ------------------------------------------------------------------------------------
def _pack(codes: torch.Tensor, bits: int) -> bytes:
    """Non-negative integers < 2^bits, ``bits`` each, least significant bit first."""
    c = codes.to(torch.int64).cpu().numpy().reshape(-1, 1)
    planes = ((c >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def _unpack(data: bytes, bits: int, count: int) -> torch.Tensor:
    planes = np.unpackbits(np.frombuffer(data, np.uint8), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.int64)).reshape(1, -1)
    return torch.from_numpy((planes.reshape(count, bits).astype(np.int64) * weights).sum(1))


def _packed_len(count: int, bits: int) -> int:
    return math.ceil(count * bits / 8)


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_raw(data: bytes, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape).clone()


def _codes(values: torch.Tensor, code: ValueCode) -> torch.Tensor:
    return torch.searchsorted(code.codebook, values.contiguous())


# encoding ---------------------------------------------------------------------------------------
def _encode_weight(W: torch.Tensor) -> tuple[dict, list[bytes]]:
    W = W.detach().cpu()
    raw_bits = W.element_size() * 8
    best = weight_storage(W)
    fmt = best["format"]
    flat = W.flatten()
    if fmt == "dense":
        code = value_code(flat, raw_bits)
        if code.codebook is None:
            return {"format": "raw"}, [_raw(W)]
        return {"format": "dense", "book": code.codebook.numel()}, [
            _raw(code.codebook),
            _pack(_codes(flat, code), code.bits),
        ]
    if fmt == "relative":
        return _encode_relative(flat, best["relative"]["b"], raw_bits)
    if fmt == "nm":
        return _encode_nm(W, raw_bits)
    M = _gemm(W)
    keep_r, keep_c = M.ne(0).any(dim=1), M.ne(0).any(dim=0)
    block = M[keep_r][:, keep_c].flatten()
    meta = {"format": fmt, "rows": int(keep_r.sum()), "cols": int(keep_c.sum())}
    masks = [_pack(keep_r.long(), 1), _pack(keep_c.long(), 1)]
    if fmt == "hybrid":
        inner, sections = _encode_relative(block, best["hybrid"]["b"], raw_bits)
        table = sections[:1] if inner["book"] else []
        return {**inner, **meta}, [*table, *masks, *sections[len(table) :]]
    code = value_code(block, raw_bits)
    if code.codebook is None:
        return {**meta, "book": 0}, [*masks, _raw(block)]
    return {**meta, "book": code.codebook.numel()}, [
        _raw(code.codebook),
        *masks,
        _pack(_codes(block, code), code.bits),
    ]


def _encode_nm(W: torch.Tensor, raw_bits: int) -> tuple[dict, list[bytes]]:
    """``n`` (position in group, value) entries per group of ``m``: the non-zeros in order,
    then zeros at the group's first free positions."""
    n, m = nm_layout(W)
    G = _gemm(W).reshape(-1, m)
    idx = torch.sort((G == 0).to(torch.int8), dim=1, stable=True).indices[:, :n]
    vals = G.gather(1, idx).flatten()
    code = value_code(vals[vals != 0], raw_bits, with_zero=bool((vals == 0).any()))
    meta = {"format": "nm", "kept": n, "m": m}
    positions = _pack(idx.flatten(), _bits_for(m))
    if code.codebook is None:
        return {**meta, "book": 0}, [positions, _raw(vals)]
    return {**meta, "book": code.codebook.numel()}, [
        _raw(code.codebook),
        positions,
        _pack(_codes(vals, code), code.bits),
    ]


def _encode_relative(flat: torch.Tensor, b: int, raw_bits: int) -> tuple[dict, list[bytes]]:
    """``flat`` as b-bit gaps (fillers where a gap exceeds 2^b) and values, codebook first."""
    gaps = relative_gaps(flat)
    f = (gaps - 1) >> b  # fillers before each non-zero
    entries = int(gaps.numel() + f.sum())
    nz = flat[flat != 0]
    code = value_code(nz, raw_bits, with_zero=bool(f.sum() > 0))
    real = torch.cumsum(f + 1, 0) - 1  # where each non-zero's entry sits
    entry_gaps = torch.full((entries,), 1 << b, dtype=torch.int64)
    entry_gaps[real] = gaps - (f << b)
    vals = torch.zeros(entries, dtype=flat.dtype)
    vals[real] = nz
    meta = {"format": "relative", "b": b, "entries": entries}
    if code.codebook is None:
        return {**meta, "book": 0}, [_pack(entry_gaps - 1, b), _raw(vals)]
    return {**meta, "book": code.codebook.numel()}, [
        _raw(code.codebook),
        _pack(entry_gaps - 1, b),
        _pack(_codes(vals, code), code.bits),
    ]


# header entries are short lists: [name, dtype, shape, format, *numbers of that format]
_FIELDS = {
    "raw": (),
    "dense": ("book",),
    "relative": ("book", "b", "entries"),
    "structured": ("book", "rows", "cols"),
    "hybrid": ("book", "rows", "cols", "b", "entries"),
    "nm": ("book", "kept", "m"),  # kept of every m
}


def export_compressed(
    model: nn.Module, path: str | os.PathLike, model_spec: dict | None = None
) -> int:
    """Write ``model``'s state packed to ``path`` (atomically); returns the bytes written.

    ``model_spec`` (e.g. ``{"name": "lenet5", "num_classes": 10, "in_channels": 1,
    "input_size": 28}``) is stored so :func:`load_compressed` can build the model by itself.
    """
    weights, transposed = layer_weights(model), transposed_weights(model)
    entries, payload, flipped = [], [], []
    for name, t in model.state_dict().items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"{name!r}: dtype {t.dtype} cannot be packed; cast the model first.")
        if name in weights and t.dtype.is_floating_point:
            if name in transposed and t.ndim == 2:
                t = t.T.contiguous()
                flipped.append(name)
            meta, sections = _encode_weight(t)
        else:
            meta, sections = {"format": "raw"}, [_raw(t)]
        fmt = meta["format"]
        entries.append([name, dtype, list(t.shape), fmt, *(meta[k] for k in _FIELDS[fmt])])
        payload.extend(sections)
    header = zlib.compress(
        json.dumps(
            {"model": model_spec, "tensors": entries, "transposed": flipped}, separators=(",", ":")
        ).encode(),
        9,
    )
    data = MAGIC + bytes([VERSION]) + struct.pack("<I", len(header)) + header + b"".join(payload)
    data += struct.pack("<I", zlib.crc32(data))
    atomic_write_bytes(Path(path), data)
    return len(data)


# decoding ---------------------------------------------------------------------------------------
class _MalformedError(ValueError):
    pass


def _entry(item) -> dict:
    """A header list as a dict, checked: known dtype and format, non-negative integer sizes."""
    try:
        name, dtype, shape, fmt, *numbers = item
        fields = _FIELDS[fmt]
    except (TypeError, ValueError, KeyError):
        raise _MalformedError(f"bad tensor entry {str(item)[:80]!r}") from None
    if dtype not in _DTYPES:
        raise _MalformedError(f"{name!r}: unknown dtype {dtype!r}")
    ints = [*shape, *numbers]
    if len(numbers) != len(fields) or not all(isinstance(v, int) and v >= 0 for v in ints):
        raise _MalformedError(f"{name!r}: bad shape or sizes {str(item)[:80]!r}")
    e = {"name": name, "dtype": _DTYPES[dtype], "shape": tuple(shape), "format": fmt}
    e.update(zip(fields, numbers))
    e["n"] = math.prod(e["shape"])
    if fmt == "nm" and not (0 < e["kept"] <= e["m"] and e["n"] % e["m"] == 0):
        raise _MalformedError(f"{name!r}: bad N:M layout {e['kept']}:{e['m']}")
    e["itemsize"] = torch.empty((), dtype=e["dtype"]).element_size()
    return e


def _sizes(e: dict) -> list[int]:
    """Byte lengths of the entry's payload sections."""
    n, item, book = e["n"], e["itemsize"], e.get("book", 0)
    table = [book * item] if book else []
    bits = _bits_for(book)
    if e["format"] == "raw":
        return [n * item]
    if e["format"] == "dense":
        return [*table, _packed_len(n, bits)]

    def relative() -> list[int]:  # b-bit gaps, then the values (codes or raw)
        entries = e["entries"]
        values = _packed_len(entries, bits) if book else entries * item
        return [_packed_len(entries, e["b"]), values]

    if e["format"] == "relative":
        return [*table, *relative()]
    if e["format"] == "nm":
        entries = n // e["m"] * e["kept"]
        values = _packed_len(entries, bits) if book else entries * item
        return [*table, _packed_len(entries, _bits_for(e["m"])), values]
    rows = e["shape"][0] if len(e["shape"]) >= 2 else 1
    cols = n // rows if rows else 0
    if e["format"] == "hybrid":
        return [*table, _packed_len(rows, 1), _packed_len(cols, 1), *relative()]
    block = e["rows"] * e["cols"]
    values = _packed_len(block, bits) if book else block * item
    return [*table, _packed_len(rows, 1), _packed_len(cols, 1), values]


def _split(data: bytes, offset: int, sizes: list[int]) -> list[bytes]:
    """The sections of ``sizes`` bytes each, one after another from ``offset``."""
    bounds = itertools.accumulate(sizes, initial=offset)
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _decode(e: dict, sections: list[bytes]) -> torch.Tensor:
    dtype, shape, n, fmt = e["dtype"], e["shape"], e["n"], e["format"]
    if fmt == "raw":
        return _from_raw(sections[0], dtype, shape)
    book_n = e["book"]
    if book_n:
        book = _from_raw(sections[0], dtype, (book_n,))
        sections = sections[1:]

    def values(data: bytes, count: int) -> torch.Tensor:
        if not book_n:
            return _from_raw(data, dtype, (count,))
        codes = _unpack(data, _bits_for(book_n), count)
        if codes.numel() and int(codes.max()) >= book_n:
            raise _MalformedError(f"{e['name']!r}: a code points past the codebook")
        return book[codes]

    if fmt == "dense":
        return values(sections[0], n).reshape(shape)

    def relative(gaps: bytes, data: bytes, count: int) -> torch.Tensor:
        pos = torch.cumsum(_unpack(gaps, e["b"], e["entries"]) + 1, 0) - 1
        if pos.numel() and int(pos[-1]) >= count:
            raise _MalformedError(f"{e['name']!r}: indices run past the {count} entries")
        out = torch.zeros(count, dtype=dtype)
        out[pos] = values(data, e["entries"])
        return out

    if fmt == "relative":
        return relative(sections[0], sections[1], n).reshape(shape)
    if fmt == "nm":
        k, m = e["kept"], e["m"]
        groups = n // m
        idx = _unpack(sections[0], _bits_for(m), groups * k).reshape(groups, k)
        if idx.numel() and int(idx.max()) >= m:
            raise _MalformedError(f"{e['name']!r}: an N:M position points past its group")
        out = torch.zeros(groups, m, dtype=dtype)
        out.scatter_(1, idx, values(sections[1], groups * k).reshape(groups, k))
        return out.reshape(shape)
    rows = shape[0] if len(shape) >= 2 else 1
    keep_r = _unpack(sections[0], 1, rows).bool()
    keep_c = _unpack(sections[1], 1, n // rows).bool()
    r, c = e["rows"], e["cols"]
    if int(keep_r.sum()) != r or int(keep_c.sum()) != c:
        raise _MalformedError(f"{e['name']!r}: row/column bitmaps disagree with the header")
    if fmt == "hybrid":
        block = relative(sections[2], sections[3], r * c)
    else:
        block = values(sections[2], r * c)
    M = torch.zeros(rows, n // rows, dtype=dtype)
    M[keep_r.nonzero().reshape(-1, 1), keep_c.nonzero().reshape(1, -1)] = block.reshape(r, c)
    return M.reshape(shape)


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    data = path.read_bytes()
    if len(data) < 12 or data[:7] != MAGIC:
        raise _MalformedError("not an admmprune compressed file (bad magic)")
    if data[7] not in _READS:
        raise _MalformedError(f"file format version {data[7]}, this admmprune reads {_READS}")
    if data[7] >= 3:  # a CRC-32 detects every error burst of up to 32 bits
        data, (crc,) = data[:-_CRC], struct.unpack("<I", data[-_CRC:])
        if zlib.crc32(data) != crc:
            raise _MalformedError("checksum mismatch (the file is corrupt or truncated)")
    (hlen,) = struct.unpack("<I", data[8:12])
    try:
        header = json.loads(zlib.decompress(data[12 : 12 + hlen]))
        items = header["tensors"]
    except (zlib.error, ValueError, KeyError, TypeError) as exc:
        raise _MalformedError(f"unreadable header ({exc})") from None
    entries = [_entry(item) for item in items]
    sizes = [_sizes(e) for e in entries]
    expected = 12 + hlen + sum(map(sum, sizes))
    if expected != len(data):
        raise _MalformedError(
            f"{len(data)} bytes, but the header describes {expected} (truncated or appended to)"
        )
    offset, state = 12 + hlen, {}
    for e, sz in zip(entries, sizes):
        state[e["name"]] = _decode(e, _split(data, offset, sz))
        offset += sum(sz)
    flipped = header.get("transposed", [])
    if not isinstance(flipped, list) or any(
        not isinstance(n, str) or n not in state or state[n].ndim != 2 for n in flipped
    ):
        raise _MalformedError(f"bad transposed list {str(flipped)[:80]!r}")
    for name in flipped:
        state[name] = state[name].T.contiguous()
    return header, state


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model written by :func:`export_compressed`, with identical weights.

    Pass ``model`` (an instance of the same architecture) unless the file names a built-in
    model. A malformed or foreign file raises ``ValueError`` saying what is wrong.
    """
    path = Path(path)
    try:
        header, state = _read(path)
    except _MalformedError as exc:
        raise ValueError(f"{path}: {exc}; re-export it with `admmprune export`.") from None
    if model is None:
        spec = header.get("model")
        from ..models import build_model, is_import_path

        if not isinstance(spec, dict) or is_import_path(str(spec.get("name", ":"))):
            raise ValueError(
                f"{path} does not name a built-in or torchvision model (a file never imports "
                "code); pass model= (an instance of the architecture it was exported from)."
            )
        spec = dict(spec)
        model = build_model(spec.pop("name"), **spec)
    check_fits(model, state, path, "pass the architecture it was exported from")
    model.load_state_dict(state)
    return model


def check_fits(model: nn.Module, state: dict, path, fix: str) -> None:
    """A clear error unless ``state`` has exactly ``model``'s tensor names and shapes."""
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    if ours != theirs:
        diff = sorted(set(ours.items()) ^ set(theirs.items()))[:6]
        raise ValueError(f"{path} does not fit this model: tensors differ ({diff}); {fix}.")
