"""Safe, atomic, checksummed checkpoint files: every load is ``weights_only``, every save is temp
+ rename.

A file written by :func:`atomic_save` is a plain ``torch.save`` zip (any ``torch.load`` reads
it) whose zip comment, the file's last bytes, is a seal::

    b"admmprune-sha256:" + 64 hex digits   the SHA-256 of every byte before the seal

so a flipped byte anywhere, a truncation or an append is refused before anything is unpickled.
A zip without a comment (``torch.save``, or admmprune before the seal) still loads, unchecked.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch

_SEAL = b"admmprune-sha256:"
_SEAL_LEN = len(_SEAL) + 64
_EOCD = b"PK\x05\x06"  # a zip's end-of-central-directory record: 22 bytes + the comment


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` sealed with a SHA-256 in its zip comment (see the module docstring), to a
    temporary file in the same folder, then renamed over ``path``: a crash mid-write leaves the
    previous file."""

    def write(tmp: Path) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = buffer.getbuffer()
        if bytes(data[-22:-18]) != _EOCD or bytes(data[-2:]) != b"\x00\x00":
            raise RuntimeError("torch.save wrote an unexpected zip ending; please report it.")
        data[-2:] = _SEAL_LEN.to_bytes(2, "little")  # the comment's length, then the comment
        digest = hashlib.sha256(data).hexdigest().encode()
        with open(tmp, "wb") as f:
            f.write(data)
            f.write(_SEAL + digest)

    _atomic(path, write)


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
    if data[-_SEAL_LEN:-64] == _SEAL:
        if hashlib.sha256(data[:-_SEAL_LEN]).hexdigest().encode() != data[-64:]:
            raise ValueError(
                f"{where}: checksum mismatch (the file is corrupt, truncated or was edited); "
                "restore it from a backup, or start over with --force."
            )
    elif data[-22:-18] != _EOCD or data[-2:] != b"\x00\x00":  # neither sealed nor plain torch
        raise ValueError(
            f"{where}: not an intact admmprune or torch checkpoint (corrupt or truncated: its "
            "ending is damaged)."
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{where}: {first} (corrupt, truncated, or not a weights-only torch file)."
        ) from None
