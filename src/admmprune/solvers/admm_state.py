r"""ADMM's per-layer variables ``Z``, ``U`` (and ``T = Z − U``), in fp32 or in low precision.

``"float32"`` (the default) keeps ``Z``, ``U`` and the cached pull target ``T`` in fp32: 12
bytes per constrained weight, three times an fp32 weight. Next to a large model that does not
fit, so two low-precision layouts keep ``Z`` and ``U`` only and compute ``T`` when read (one
layer at a time, in fp32):

- ``"bfloat16"``: ``Z`` and ``U`` in bf16, 4 bytes per weight (1× an fp32 weight);
- ``"float8"``: ``Z`` in ``float8_e4m3fn`` with a per-tensor scale (``amax(|Z|)/448``) and ``U``
  in bf16, 3 bytes per weight (Elsa-L's layout).

In both, ``Z`` (a projection: mostly zeros at high sparsity) is kept as a bitmask of its
non-zeros plus their values whenever that is smaller than the dense low-precision tensor
(``n/8 + nnz·b < n·b`` bytes, ``b`` the value's size): at 90 % sparsity bf16's ``Z`` takes
0.325 bytes per weight instead of 2. The choice is remade at every update; it changes storage
only, never a value.

Every read and every update computes in fp32; only storage rounds. Zeros stay exactly zero in
every format, so ``Z``'s support is what the projection chose.
"""

from __future__ import annotations

import torch

__all__: list[str] = []  # internal: ADMM(state_dtype=...)

STATE_DTYPES = ("float32", "bfloat16", "float8")
_E4M3_MAX = 448.0


def _pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A bool tensor as bytes, 8 flags each, least significant bit first."""
    flat = keep.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    bits = 1 << torch.arange(8, dtype=torch.uint8, device=keep.device)
    return (flat.view(-1, 8).to(torch.uint8) * bits).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    bits = 1 << torch.arange(8, dtype=torch.uint8, device=packed.device)
    return (packed[:, None] & bits).ne(0).reshape(-1)[:count]


class _LayerState:
    """fp32 ``Z``, ``U`` and the cached ``T = Z − U`` (the W-step pulls W towards it)."""

    dtype = "float32"

    def __init__(self, Z: torch.Tensor, U: torch.Tensor) -> None:
        self.Z, self.U = Z, U
        self.T = Z - U

    @property
    def device(self) -> torch.device:
        return self.Z.device

    def to(self, device: torch.device) -> _LayerState:
        self.Z, self.U, self.T = self.Z.to(device), self.U.to(device), self.T.to(device)
        return self

    def plus_U(self, W: torch.Tensor) -> torch.Tensor:
        """``V = W + U`` (the stale ``T`` serves as its buffer: fresh ones cost page faults)."""
        return torch.add(W, self.U, out=self.T)

    def advance(self, W: torch.Tensor, Z: torch.Tensor, rescale: float) -> tuple[float, float]:
        """``U ← (U + W − Z)·rescale``, ``Z ← Z``; returns ``(||Z − Z_old||, ||W − Z||)``."""
        changed = float(torch.linalg.vector_norm(torch.sub(Z, self.Z, out=self.T)))
        R = torch.sub(W, Z, out=self.Z)  # primal residual W^{k+1} − Z^{k+1}
        primal = float(torch.linalg.vector_norm(R))
        self.U.add_(R)
        if rescale != 1.0:
            self.U.mul_(rescale)
        self.Z = Z
        torch.sub(Z, self.U, out=self.T)
        return changed, primal

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.Z, self.U, self.T))

    def tensors(self) -> list[torch.Tensor]:
        """The stored tensors, for a broadcast in place (distributed runs)."""
        return [self.Z, self.U, self.T]

    def saved(self) -> dict:
        return {"Z": self.Z.cpu(), "U": self.U.cpu()}

    @classmethod
    def restored(cls, saved: dict, device: torch.device) -> _LayerState:
        return cls(saved["Z"].to(device, torch.float32).clone(),
                   saved["U"].to(device, torch.float32).clone())  # fmt: skip


class _LowState:
    """``Z`` and ``U`` stored in low precision (see the module docstring); ``T`` not cached."""

    def __init__(self, Z: torch.Tensor, U: torch.Tensor, dtype: str) -> None:
        self.dtype = dtype
        self._store(Z, U)

    def _store(self, Z: torch.Tensor, U: torch.Tensor) -> None:
        scale = 1.0
        if self.dtype == "float8":
            amax = float(Z.abs().max()) if Z.numel() else 0.0
            scale = amax / _E4M3_MAX if amax > 0 else 1.0
            Zq = (Z / scale).to(torch.float8_e4m3fn)
        else:
            Zq = Z.to(torch.bfloat16)
        self._scale = torch.tensor([scale], dtype=torch.float32, device=Z.device)
        self._U = U.to(torch.bfloat16)
        self._Z, self._mask = Zq, None
        keep = Zq.float() != 0  # what rounded to zero is zero: the stored support
        nnz = int(keep.sum())
        if -(-Zq.numel() // 8) + nnz * Zq.element_size() < Zq.numel() * Zq.element_size():
            self._Z, self._mask = Zq[keep], _pack_bits(keep)

    def _dense_Z(self) -> torch.Tensor:
        """The stored ``Z`` as a dense tensor of its storage dtype (unscaled)."""
        if self._mask is None:
            return self._Z
        out = torch.zeros(self._U.shape, dtype=self._Z.dtype, device=self._Z.device)
        out.view(-1)[_unpack_bits(self._mask, out.numel())] = self._Z
        return out

    @property
    def scale(self) -> float:
        return float(self._scale)

    @property
    def Z(self) -> torch.Tensor:
        Z = self._dense_Z().float()
        return Z.mul_(self._scale) if self.dtype == "float8" else Z

    @property
    def U(self) -> torch.Tensor:
        return self._U.float()

    @property
    def T(self) -> torch.Tensor:
        return self.Z.sub_(self._U.float())

    @property
    def device(self) -> torch.device:
        return self._Z.device

    def to(self, device: torch.device) -> _LowState:
        self._Z, self._U, self._scale = (x.to(device) for x in (self._Z, self._U, self._scale))
        if self._mask is not None:
            self._mask = self._mask.to(device)
        return self

    def plus_U(self, W: torch.Tensor) -> torch.Tensor:
        return W + self._U.float()

    def advance(self, W: torch.Tensor, Z: torch.Tensor, rescale: float) -> tuple[float, float]:
        changed = float(torch.linalg.vector_norm(Z - self.Z))
        R = W - Z
        primal = float(torch.linalg.vector_norm(R))
        U = R.add_(self._U.float())
        self._store(Z, U.mul_(rescale) if rescale != 1.0 else U)
        return changed, primal

    def nbytes(self) -> int:
        stored = (self._Z, self._U) + (() if self._mask is None else (self._mask,))
        return sum(x.numel() * x.element_size() for x in stored)

    def tensors(self) -> list[torch.Tensor]:
        """The stored bits as integer views (collectives may not carry float8 / bf16), and
        the scale. ``Z`` goes dense first: every rank's tensors then have the same shapes
        (the next update packs it again)."""
        self._Z, self._mask = self._dense_Z(), None
        return [self._Z.view(torch.uint8 if self.dtype == "float8" else torch.int16),
                self._U.view(torch.int16), self._scale]  # fmt: skip

    def saved(self) -> dict:
        packed = {} if self._mask is None else {"Z_mask": self._mask.cpu()}
        return {"Z": self._Z.cpu(), "U": self._U.cpu(), "scale": self.scale, **packed}

    @classmethod
    def restored(cls, saved: dict, device: torch.device, dtype: str) -> _LowState:
        st = cls.__new__(cls)
        st.dtype = dtype
        st._Z, st._U = saved["Z"].to(device).clone(), saved["U"].to(device).clone()
        st._mask = saved["Z_mask"].to(device).clone() if "Z_mask" in saved else None
        st._scale = torch.tensor([float(saved["scale"])], dtype=torch.float32, device=device)
        return st


def make_state(Z: torch.Tensor, U: torch.Tensor, dtype: str):
    return _LayerState(Z, U) if dtype == "float32" else _LowState(Z, U, dtype)
