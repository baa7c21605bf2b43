"""Block locks: one worker trains a block at a time, and a dead holder does not keep it.

A lock is a file created with ``O_CREAT | O_EXCL`` holding the holder's host, pid and a
heartbeat time that a background thread refreshes. Another worker may take the lock over when
the holder is provably dead (same host, pid gone), its heartbeat is older than
``stale_after`` seconds (a holder on another machine that was killed or lost), or the file is
not a psm lock at all (unreadable contents: nothing would ever refresh it).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from .atomic import atomic_write_json, write_error

HEARTBEAT_SECONDS = 10.0
STALE_AFTER_SECONDS = 120.0
BEING_WRITTEN_SECONDS = 5.0
"""An empty lock file younger than this is one its creator is still writing."""

UNREADABLE = {"unreadable": True}


def _read(path: Path) -> dict | None:
    """The lock's record; None when there is no lock; :data:`UNREADABLE` for contents that are
    not a psm lock record (garbage, or empty while its creator writes it)."""
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return dict(UNREADABLE)
    return info if isinstance(info, dict) else dict(UNREADABLE)


def _unreadable_and_stale(path: Path, info: dict) -> bool:
    """A lock whose contents are not a psm record is stale, unless it is an empty file just
    created (its creator is about to write the record)."""
    if not info.get("unreadable"):
        return False
    try:
        st = path.stat()
    except FileNotFoundError:
        return True
    return st.st_size > 0 or time.time() - st.st_mtime > BEING_WRITTEN_SECONDS


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(path: Path, info: dict, stale_after: float) -> bool:
    if info.get("unreadable"):
        return _unreadable_and_stale(path, info)
    same_host = info.get("host") == socket.gethostname()
    if same_host and isinstance(info.get("pid"), int) and not _pid_alive(info["pid"]):
        return True
    beat = info.get("heartbeat")
    if not isinstance(beat, (int, float)):
        try:
            beat = path.stat().st_mtime
        except FileNotFoundError:
            return True
    return time.time() - beat > stale_after


def _take_over(path: Path, stale: dict, token: str) -> bool:
    """Remove a dead holder's lock file; False if a live taker got there first.

    Two workers may both judge the same lock stale. The first renames it away and creates its
    own; the second's rename would then move that FRESH lock. So the renamed file is checked
    against the stale record that was judged (same token and heartbeat), and a fresh or
    refreshed one is put back (``link`` refuses to overwrite whatever was created meanwhile).
    """
    grave = path.with_name(f"{path.name}.stale-{token}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return True  # gone already: try to create it again
    moved = _read(grave)
    try:
        if moved and stale and moved != stale:
            with contextlib.suppress(OSError):  # FileExistsError: a newer lock is there
                os.link(grave, path)
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(grave)


def held_elsewhere(path: Path, stale_after: float = STALE_AFTER_SECONDS) -> bool:
    """Whether a live-looking holder on ANOTHER host has the lock at ``path``.

    Such a holder may have died with its machine; its lock turns stale ``stale_after`` seconds
    after its last heartbeat. (A dead holder on this host is seen at once from its pid.)
    """
    info = _read(path)
    if not info or info.get("unreadable") or info.get("host") == socket.gethostname():
        return False
    return not _is_stale(path, info, stale_after)


def lock_holder_alive(path: Path, stale_after: float = STALE_AFTER_SECONDS) -> bool:
    """Whether a lock file exists and its holder looks alive."""
    info = _read(path)
    return info is not None and not _is_stale(path, info, stale_after)


def lock_holder(path: Path) -> str | None:
    """``host:pid`` of a lock's holder, for messages."""
    info = _read(path)
    if not info or info.get("unreadable"):
        return None
    return f"{info.get('host', '?')}:{info.get('pid', '?')}"


class BlockLocks:
    """Locks on a set of block lock files with one heartbeat thread.

    Use :meth:`acquire` per path (it returns False when a live holder has it), and
    :meth:`release_all` (or the context manager) at the end.
    """

    def __init__(
        self,
        *,
        heartbeat: float = HEARTBEAT_SECONDS,
        stale_after: float = STALE_AFTER_SECONDS,
    ) -> None:
        self._held: dict[Path, str] = {}
        self._heartbeat = heartbeat
        self._stale_after = stale_after
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _info(self, token: str) -> dict:
        now = time.time()
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": token,
            "heartbeat": now,
        }

    def acquire(self, path: Path) -> bool:
        """Take the lock at ``path``; False if a live holder has it.

        Raises:
            RunError: the lock file cannot be created (read-only or full disk, no permission).
        """
        token = uuid.uuid4().hex
        for _ in range(5):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = _read(path)
                if info is None:
                    continue  # vanished: try again
                if not _is_stale(path, info, self._stale_after):
                    return False
                if info.get("unreadable"):
                    print(
                        f"psm: warning: {path} is not a psm lock (unreadable contents); "
                        "taking it over as stale",
                        file=sys.stderr,
                    )
                if not _take_over(path, info, token):
                    return False
                continue
            except OSError as e:
                raise write_error(path, e) from None
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(self._info(token), f)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise write_error(path, e) from None
            with self._mutex:
                self._held[path] = token
            self._start()
            return True
        return False

    def holds(self, path: Path) -> bool:
        with self._mutex:
            return path in self._held

    def release(self, path: Path) -> None:
        """Remove the lock at ``path`` if this object still holds it."""
        with self._mutex:
            token = self._held.pop(path, None)
        if token is None:
            return
        info = _read(path)
        if info and info.get("token") == token:
            # on a disk turned read-only the file stays; its dead pid makes it stale
            with contextlib.suppress(OSError):
                os.unlink(path)

    def release_all(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._mutex:
            paths = list(self._held)
        for p in paths:
            self.release(p)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, daemon=True, name="psm-lock")
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat):
            with self._mutex:
                held = dict(self._held)
            for path, token in held.items():
                info = _read(path)
                if info and info.get("token") == token:
                    with contextlib.suppress(Exception):
                        atomic_write_json(path, self._info(token), durable=False)

    def __enter__(self) -> BlockLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_all()


def acquire_many(locks: BlockLocks, paths: Iterable[Path]) -> list[Path]:
    """Acquire each path; return the ones this process now holds."""
    return [p for p in paths if locks.acquire(p)]
