r"""Generation with unstructured sparse Linears on the CPU: a kernel that reads only the kept
weights, for the few rows of a decoding step (batch 1–8).

For each kept weight the layer stores its value (fp32) and its column (``uint16`` when the
layer has at most 65,536 inputs, else ``int32``), rows delimited by offsets::

    y[b, r] = Σ_{j = ptr[r]}^{ptr[r+1] − 1} val[j] · x[b, col[j]] + bias[r]

6 bytes per kept weight instead of 4 per weight: a decoding step is memory bound, so at 90 %
sparsity the layer reads 0.6 bytes per weight, not 4. The kernel is C (rows split over
``torch.get_num_threads()`` OpenMP threads), compiled on first use by the system's C compiler
into ``$ADMMPRUNE_CACHE`` (default ``~/.cache/admmprune``, keyed by source, flags and CPU) and
called through ``ctypes``; without a compiler the layers stay dense and the report says why.

:func:`to_sparse_decode` swaps each pruned ``nn.Linear`` of a model for a
:class:`SparseDecodeLinear` where the kernel measures faster than the dense layer on the
serving batch (paired timing, as :func:`admmprune.deployment.sparse.to_columns` does), and
leaves it dense elsewhere. More rows than ``MAX_KERNEL_ROWS`` (a long prompt's prefill) run as
a dense GEMM on the weight rebuilt for that call.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from .latency import measure_paired

__all__ = ["DecodeReport", "SparseDecodeLinear", "kernel_available", "to_sparse_decode"]

MAX_KERNEL_ROWS = 16  # above: a GEMM on the rebuilt weight beats passes over the sparse one

_SOURCE = r"""
#include <stdint.h>
#define KERNEL(NAME, IDX)                                                                    \
void NAME(int64_t rows, int64_t in, const int64_t *ptr, const IDX *col, const float *val,   \
          const float *x, int64_t nx, const float *bias, float *y, int threads) {            \
  for (int64_t b0 = 0; b0 < nx; b0 += 8) {                                                   \
    const int64_t nb = nx - b0 < 8 ? nx - b0 : 8;                                            \
    const float *xb = x + b0 * in;                                                           \
    float *yb = y + b0 * rows;                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                        \
    for (int64_t r = 0; r < rows; r++) {                                                     \
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                               \
      const int64_t end = ptr[r + 1];                                                        \
      int64_t j = ptr[r];                                                                    \
      if (nb == 1) {                                                                         \
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0;                                                \
        for (; j + 3 < end; j += 4) {                                                        \
          a0 += val[j] * xb[col[j]];                                                         \
          a1 += val[j + 1] * xb[col[j + 1]];                                                 \
          a2 += val[j + 2] * xb[col[j + 2]];                                                 \
          a3 += val[j + 3] * xb[col[j + 3]];                                                 \
        }                                                                                    \
        for (; j < end; j++) a0 += val[j] * xb[col[j]];                                      \
        acc[0] = (a0 + a1) + (a2 + a3);                                                      \
      } else {                                                                               \
        for (; j < end; j++) {                                                               \
          const float v = val[j];                                                            \
          const int64_t c = col[j];                                                          \
          for (int64_t b = 0; b < nb; b++) acc[b] += v * xb[b * in + c];                     \
        }                                                                                    \
      }                                                                                      \
      for (int64_t b = 0; b < nb; b++) yb[b * rows + r] = acc[b] + (bias ? bias[r] : 0.0f);  \
    }                                                                                        \
  }                                                                                          \
}
KERNEL(sparse_rows_u16, uint16_t)
KERNEL(sparse_rows_i32, int32_t)
"""
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


class _NoKernelError(RuntimeError):
    pass


_LIB: ctypes.CDLL | None = None
_WHY_NOT: str | None = None


def _cache_dir() -> Path:
    return Path(os.environ.get("ADMMPRUNE_CACHE") or Path.home() / ".cache" / "admmprune")


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    return platform.processor()


def _compile() -> Path:
    key = hashlib.sha1("\n".join([_SOURCE, *_FLAGS, _cpu(), platform.machine()]).encode())
    lib = _cache_dir() / "kernels" / f"decode-{key.hexdigest()[:16]}.so"
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src, out = Path(tmp) / "decode.c", Path(tmp) / "decode.so"
        src.write_text(_SOURCE)
        try:
            done = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)],
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as e:
            raise _NoKernelError(f"no C compiler ({cc!r}: {e}); set CC or install gcc") from None
        if done.returncode != 0:
            raise _NoKernelError(f"{cc} failed: {done.stderr.strip()[:300]}")
        os.replace(out, lib)  # atomic: a concurrent process sees the old state or this file
    return lib


def _library() -> ctypes.CDLL:
    global _LIB, _WHY_NOT
    if _LIB is None and _WHY_NOT is None:
        try:
            lib = ctypes.CDLL(str(_compile()))
        except (_NoKernelError, OSError) as e:
            _WHY_NOT = str(e)
        else:
            for fn in (lib.sparse_rows_u16, lib.sparse_rows_i32):
                fn.restype = None
                pointers = [ctypes.c_void_p] * 4
                fn.argtypes = [ctypes.c_int64, ctypes.c_int64, *pointers, ctypes.c_int64,
                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]  # fmt: skip
            _LIB = lib
    if _LIB is None:
        raise _NoKernelError(_WHY_NOT)
    return _LIB


def kernel_available() -> tuple[bool, str]:
    """Whether the decode kernel compiled and loaded here, and if not, why."""
    try:
        _library()
    except _NoKernelError as e:
        return False, str(e)
    return True, "ok"


class SparseDecodeLinear(nn.Module):
    """An ``nn.Linear`` (fp32, CPU) that stores and reads only its non-zero weights
    (module docstring); computes ``F.linear(x, W, b)`` for the masked ``W``, inference only.
    Its tensors are buffers with names of their own: save a model (``save_pretrained``,
    :func:`admmprune.save_sparse`) before converting it, and convert again after loading."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        W = linear.weight.detach()
        if W.dtype != torch.float32 or W.device.type != "cpu":
            raise ValueError(
                f"SparseDecodeLinear takes fp32 CPU weights, got {W.dtype} on {W.device}."
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features
        keep = W != 0
        self.register_buffer("ptr", torch.cat([torch.zeros(1, dtype=torch.int64),
                                               keep.sum(1).cumsum(0)]))  # fmt: skip
        cols = keep.nonzero()[:, 1]
        # uint16 read from int16 storage (torch has few uint16 ops): columns below 65,536
        self.wide = self.in_features > 1 << 16
        self.register_buffer("col", cols.to(torch.int32) if self.wide else cols.to(torch.int16))
        self.register_buffer("val", W[keep].contiguous())
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())

    def extra_repr(self) -> str:
        kept = self.val.numel() / max(self.in_features * self.out_features, 1)
        return f"in={self.in_features}, out={self.out_features}, kept={kept:.3f}"

    def dense_weight(self) -> torch.Tensor:
        """The dense weight (zeros where pruned)."""
        W = torch.zeros(self.out_features, self.in_features)
        rows = torch.repeat_interleave(torch.arange(self.out_features), self.ptr.diff())
        W[rows, self.col.long() & 0xFFFF if not self.wide else self.col.long()] = self.val
        return W

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if (x2.shape[0] > MAX_KERNEL_ROWS or x.dtype != torch.float32 or x.device.type != "cpu"
                or (x.requires_grad and torch.is_grad_enabled())):  # fmt: skip
            return functional.linear(x, self.dense_weight().to(x), self.bias)
        x2 = x2.contiguous()
        y = torch.empty(x2.shape[0], self.out_features)
        lib = _library()
        kernel = lib.sparse_rows_i32 if self.wide else lib.sparse_rows_u16
        kernel(self.out_features, self.in_features, self.ptr.data_ptr(), self.col.data_ptr(),
               self.val.data_ptr(), x2.data_ptr(), x2.shape[0],
               None if self.bias is None else self.bias.data_ptr(), y.data_ptr(),
               torch.get_num_threads())  # fmt: skip
        return y.reshape(*lead, self.out_features)


@dataclass
class DecodeReport:
    """What :func:`to_sparse_decode` did per Linear: the median ms of the dense layer and of
    the kernel on the serving batch, and which it kept (or why it skipped the layer)."""

    timings_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    sparse: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def to_sparse_decode(
    model: nn.Module,
    *,
    batch: int = 1,
    rounds: int = 15,
    max_kept: float = 0.7,
    measure: bool = True,
) -> DecodeReport:
    """Swap (in place) every ``nn.Linear`` with at most ``max_kept`` of its weights non-zero for
    a :class:`SparseDecodeLinear` where the kernel is faster on ``batch`` rows (paired timing,
    ``rounds`` pairs; ``measure=False`` swaps every such layer untimed); returns the report
    (also ``model.decode_report``). Layers stay dense when the kernel is unavailable (the
    reason is in ``report.skipped["<kernel>"]``)."""
    report = DecodeReport()
    ok, why = kernel_available()
    if not ok:
        report.skipped["<kernel>"] = why
        model.decode_report = report
        return report
    swaps = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        W = m.weight
        if W.dtype != torch.float32 or W.device.type != "cpu":
            report.skipped[name] = f"{W.dtype} on {W.device}: the kernel is fp32 CPU"
            continue
        kept = float((W != 0).float().mean())
        if kept > max_kept:
            report.skipped[name] = f"{kept:.0%} of its weights kept"
            continue
        sparse = SparseDecodeLinear(m)
        x = torch.randn(batch, m.in_features, generator=torch.Generator().manual_seed(0))
        ref = functional.linear(x, W, m.bias)
        if not torch.allclose(sparse(x), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max())):
            raise RuntimeError(f"{name!r}: the sparse kernel disagrees with the layer (a bug).")
        if not measure:
            swaps.append((name, sparse))
            continue
        ms = measure_paired({"dense": m, "sparse": sparse}, x, rounds)
        dense_ms, sparse_ms = report.timings_ms[name] = (ms["dense"], ms["sparse"])
        if sparse_ms < dense_ms:
            swaps.append((name, sparse))
    for name, sparse in swaps:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, sparse)
        report.sparse.append(name)
    model.decode_report = report
    return report
