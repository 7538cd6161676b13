"""Safe, atomic, checksummed checkpoint files: every load is ``weights_only``, every save is temp
+ rename.

A file written by :func:`atomic_save` is sealed::

    b"ADMMPT1\\n"   8 bytes
    torch.save      the object, a plain torch zip
    SHA-256         32 bytes, of everything before it

so a flipped byte anywhere, a truncation or an append is refused before anything is unpickled.
Plain torch files (written by ``torch.save``, or by admmprune before 0.2) still load, unchecked.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

SEAL = b"ADMMPT1\n"
_DIGEST = 32
_ZIP = b"PK\x03\x04"  # a plain torch.save file (legacy, no checksum)


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` sealed with a SHA-256 (see the module docstring), to a temporary file in
    the same folder, then renamed over ``path``: a crash mid-write leaves the previous file."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            sink = _Hashing(f)
            sink.write(SEAL)
            torch.save(obj, sink)
            f.write(sink.hash.digest())

    _atomic(path, write)


def atomic_save_plain(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` as it is (readable by any ``torch.load``), written atomically."""
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, like :func:`atomic_save`."""
    _atomic(path, lambda tmp: tmp.write_bytes(data))


class _Hashing:
    """A write-only file that hashes what passes through it."""

    def __init__(self, f) -> None:
        self.f, self.hash = f, hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _atomic(path: str | os.PathLike, write) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def safe_load(path: str | os.PathLike, what: str) -> object:
    """Load a sealed (checksum verified) or plain torch file, ``weights_only``, on CPU.

    ``weights_only`` refuses any pickled global, so no code in the file ever runs. Every failure
    is a ``ValueError`` that names the file and what is wrong with it.
    """
    where = f"cannot read {what} from {str(path)!r}"
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file.") from None
    except OSError as exc:
        raise ValueError(f"{where}: {exc.strerror or exc}.") from None
    if data.startswith(SEAL):
        body, digest = data[len(SEAL) : -_DIGEST], data[-_DIGEST:]
        if len(data) < len(SEAL) + _DIGEST or hashlib.sha256(data[:-_DIGEST]).digest() != digest:
            raise ValueError(
                f"{where}: checksum mismatch (the file is corrupt, truncated or was edited); "
                "restore it from a backup, or start over with --force."
            )
    elif data.startswith(_ZIP):
        body = data
    else:
        raise ValueError(f"{where}: not an admmprune or torch checkpoint file (unknown header).")
    try:
        return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{where}: {first} (corrupt, truncated, or not a weights-only torch file)."
        ) from None
