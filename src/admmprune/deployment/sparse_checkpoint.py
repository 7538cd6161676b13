"""Sparse checkpoints of Hugging Face models: the pruned weights in the storage accounting's
formats inside a safetensors file, loaded back as an ordinary ``transformers`` model.

``save_sparse(model, DIR)`` writes ``save_pretrained``'s config (and generation config, and the
tokenizer when given) and ``DIR/model-sparse.safetensors``, which holds every tensor of the
state dict once (tied weights once):

- a Conv/Linear/Conv1D/expert weight that a sparse format stores in fewer bytes: one ``uint8``
  tensor under its own name, the sections of its format (relative indices and values, the N:M
  positions and values, codes into a codebook after quantization, the structured block with
  its bitmaps — :mod:`.compressed`'s encodings, of the weight's GEMM view) one after another;
- every other tensor as itself (any safetensors reader sees embeddings, norms, dense layers).

The safetensors metadata ``"admmprune"`` (a CRC-32 of the JSON, a space, the JSON) lists the
encoded weights (format, sizes, dtype, shape, view), the tied names, the model class and a CRC-32
of every stored tensor. The same model gives the same file, byte for byte.
``load_sparse(DIR)`` decodes them: the same tensors bit for bit, in a model built from the
config (a ``transformers`` class named in the file, or the ``model=`` the caller passes; no
code is imported from the file). A damaged file is refused, naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_write_bytes
from ..weights.gemm import expert_layouts, gemm_view, layer_weights, transposed_weights
from .compressed import (
    _FIELDS,
    _decode,
    _encode_weight,
    _entry,
    _MalformedError,
    _sizes,
    _split,
    check_fits,
)

__all__ = ["SPARSE_FILE", "load_sparse", "save_sparse"]

SPARSE_FILE = "model-sparse.safetensors"
_KEY = "admmprune"
_VERSION = 1


def _view(name: str, transposed: set[str], experts: dict[str, bool]) -> str:
    """How the stored tensor becomes its GEMM view: ``""``, ``"T"`` (Conv1D), ``"experts"``
    or ``"experts_T"`` (fused experts stored ``[E, in, out]``)."""
    if name in experts:
        return "experts_T" if experts[name] else "experts"
    return "T" if name in transposed else ""


def _to_gemm(t: torch.Tensor, view: str) -> torch.Tensor:
    if view == "T" and t.ndim != 2:
        return t
    return gemm_view(t, view.endswith("T"), view.startswith("experts")).contiguous()


def _from_gemm(M: torch.Tensor, view: str, shape: tuple[int, ...]) -> torch.Tensor:
    if view == "experts":
        return M.reshape(shape)
    if view == "experts_T":
        E, n_in, n_out = shape
        return M.reshape(E, n_out, n_in).transpose(1, 2).contiguous()
    if view == "T" and len(shape) == 2:
        return M.T.contiguous()
    return M.reshape(shape)


def _crc(t: torch.Tensor) -> int:
    """CRC-32 of the tensor's dtype, shape and bytes (bytes alone would pass a re-typed one)."""
    crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode())
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy(), crc)


@torch.no_grad()
def save_sparse(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> int:
    """Write ``model`` (a ``transformers`` model, pruned) to ``directory`` as a sparse
    checkpoint (see the module docstring); returns the bytes of ``model-sparse.safetensors``.

    ``dtype`` (e.g. ``torch.float16``) casts the floating-point tensors first, as
    ``save_pretrained``'s ``torch_dtype`` would; by default they keep theirs. An existing
    sparse checkpoint in ``directory`` is replaced only with ``overwrite=True``.
    """
    from safetensors.torch import save

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{str(directory)!r} is a file; give save_sparse a folder.")
    target = directory / SPARSE_FILE
    if target.exists() and not overwrite:
        raise ValueError(
            f"{str(target)!r} exists; pass overwrite=True to replace it (or another folder)."
        )
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError(
            f"save_sparse takes a transformers model (with .config); got {type(model).__name__}. "
            "For any other model use admmprune.export_compressed."
        )
    weights, transposed = layer_weights(model), transposed_weights(model)
    experts = expert_layouts(model)
    tensors: dict[str, torch.Tensor] = {}
    encoded, tied, crcs = [], {}, {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:  # a tied weight (lm_head = embeddings): once
            tied[name] = seen[key]
            continue
        seen[key] = name
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        view = _view(name, transposed, experts)
        if name in weights and t.is_floating_point():
            M = _to_gemm(t, view)
            meta, sections = _encode_weight(M)
            if meta["format"] != "raw":
                fmt = meta["format"]
                encoded.append([name, str(t.dtype).removeprefix("torch."), list(M.shape), fmt,
                                *(meta[k] for k in _FIELDS[fmt]), view, list(t.shape)])  # fmt: skip
                blob = b"".join(sections)
                tensors[name] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
                crcs[name] = _crc(tensors[name])
                continue
        tensors[name] = t.contiguous().clone()
        crcs[name] = _crc(tensors[name])
    header = {"version": _VERSION, "class": type(model).__name__, "encoded": encoded,
              "tied": tied, "crc32": crcs}  # fmt: skip
    text = json.dumps(header, separators=(",", ":"))
    # one metadata entry, "<CRC-32 of the JSON> <JSON>": safetensors writes its metadata map in
    # no fixed order, so two entries would make the same model's file differ from save to save
    data = save(tensors, metadata={_KEY: f"{zlib.crc32(text.encode())} {text}"})
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(generation, "save_pretrained"):
        generation.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    atomic_write_bytes(target, data)
    return len(data)


def _read_sparse(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header and the decoded state dict of ``path``; :class:`_MalformedError` if damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle)
    except Exception as e:  # safetensors' own errors for a truncated or garbled file
        raise _MalformedError(
            f"not a readable safetensors file ({type(e).__name__}: {e})"
        ) from None
    crc, _, text = meta.get(_KEY, "").partition(" ")
    if crc != str(zlib.crc32(text.encode())):
        raise _MalformedError("the admmprune header fails its checksum (corrupt, or not saved "
                              "by save_sparse)")  # fmt: skip
    try:
        header = json.loads(text)
        encoded, tied, crcs = header["encoded"], header["tied"], header["crc32"]
    except (KeyError, ValueError, TypeError):
        raise _MalformedError(
            "no admmprune sparse-checkpoint header (not saved by save_sparse)"
        ) from None
    if header.get("version") != _VERSION:
        raise _MalformedError(f"sparse checkpoint version {header.get('version')!r}")
    if set(crcs) != set(stored):
        raise _MalformedError("the tensors stored differ from the header's list")
    for name, t in stored.items():
        if _crc(t) != crcs[name]:
            raise _MalformedError(f"tensor {name!r} fails its checksum (the file is corrupt)")
    state = dict(stored)
    for item in encoded:
        try:
            *entry, view, shape = item
            e = _entry(entry)
        except (TypeError, ValueError) as exc:
            raise _MalformedError(f"bad entry {str(item)[:80]!r} ({exc})") from None
        blob = stored.get(e["name"])
        sizes = _sizes(e)
        if blob is None or blob.dtype != torch.uint8 or blob.numel() != sum(sizes):
            raise _MalformedError(f"tensor {e['name']!r} does not have its format's size")
        sections = _split(blob.numpy().tobytes(), 0, sizes)
        state[e["name"]] = _from_gemm(_decode(e, sections), view, tuple(shape))
    for name, same in tied.items():
        if same not in state:
            raise _MalformedError(f"tied tensor {name!r} points at missing {same!r}")
        state[name] = state[same]
    return header, state


def load_sparse(
    directory: str | os.PathLike, model: nn.Module | None = None, *, sparse_kernels: bool = False
) -> nn.Module:
    """The model :func:`save_sparse` wrote to ``directory``, in eval mode: dense tensors equal
    bit for bit to the saved ones. ``model`` (optional) is an instance to load into; by
    default the ``transformers`` class named in the file is built from ``config.json``.
    ``sparse_kernels=True`` then swaps each pruned Linear for the decode kernel
    (:func:`admmprune.deployment.decode.to_sparse_decode`) where it measures faster."""
    directory = Path(directory)
    path = directory / SPARSE_FILE
    if not path.is_file():
        raise ValueError(f"{str(path)!r} not found; write it with admmprune.save_sparse.")
    try:
        header, state = _read_sparse(path)
    except _MalformedError as exc:
        raise ValueError(f"{path}: {exc}; save it again with admmprune.save_sparse.") from None
    if model is None:
        import transformers

        cls = getattr(transformers, str(header.get("class")), None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ValueError(
                f"{path} was saved from {header.get('class')!r}, not a transformers class; pass "
                "model= (an instance of that architecture)."
            )
        config = transformers.AutoConfig.from_pretrained(directory)
        model = cls(config)
    check_fits(model, state, path, "load it into the architecture (and config) it was saved from")
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    model.load_state_dict(state)
    model.eval()
    if sparse_kernels:
        from .decode import to_sparse_decode

        to_sparse_decode(model)
    return model
