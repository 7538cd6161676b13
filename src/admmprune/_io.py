"""Safe, atomic checkpoint files: every load is ``weights_only``, every save is temp + rename."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``.

    A crash mid-write leaves the previous file intact, never a truncated one.
    """
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, like :func:`atomic_save`."""
    _atomic(path, lambda tmp: tmp.write_bytes(data))


def _atomic(path: str | os.PathLike, write) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def safe_load(path: str | os.PathLike, what: str) -> object:
    """``torch.load(path, weights_only=True)`` on CPU; a bad file is a ``ValueError``.

    ``weights_only`` refuses any pickled global, so no code in the file ever runs.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"cannot read {what} from {str(path)!r}: no such file.") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"cannot read {what} from {str(path)!r}: {first} "
            "(corrupt, truncated, or not a weights-only torch file)."
        ) from None
