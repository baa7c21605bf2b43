"""Atomic file writes: a temp file in the same folder, fsync, then rename over the target.

A reader (or a resumed worker) sees either the old file or the new one, never a torn one. A
write that fails (no space, no permission) removes its temp file and raises a one-line
:class:`~psm.errors.RunError`, leaving the old file as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import RunError

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone gives 0o600


def write_error(path: Path, err: OSError) -> RunError:
    """A one-line error for a failed write of ``path``."""
    reason = _REASONS.get(err.errno or 0, err.strerror or str(err))
    return RunError(f"cannot write {path}: {reason}")


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: the target.
        data: the bytes.
        durable: fsync before the rename (checkpoints); progress records may skip it.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, _FILE_MODE)
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise write_error(path, e) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode(), durable=durable)


def atomic_write_json(path: str | Path, obj: Any, *, durable: bool = True) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n", durable=durable)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log file (one writer per file).

    A failed append (no space) is cut back off, so the file never ends in a torn line.
    """
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise write_error(path, e) from None
    finally:
        os.close(fd)
