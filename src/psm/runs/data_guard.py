"""The data guard: ``data.json`` records the shape of a point and a content digest of every
data file a run reads, so a run refuses data whose content changed since it was created."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..data import DataError, Dataset
from .config import RunConfig


def file_digest(path: Path, known: dict[str, Any] | None = None) -> str:
    """The sha256 of a file's content; reuses ``known["sha256"]`` when the file's size and
    modification time are those recorded beside it (large image arrays are hashed once)."""
    st = path.stat()
    if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        return str(known.get("sha256"))
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_manifest(config: RunConfig, dataset: Dataset) -> dict[str, Any]:
    """What ``data.json`` records: the shape of a point and each data file's size,
    modification time and sha256."""
    files = {}
    for p in config.data.files():
        st = p.stat()
        files[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_digest(p)}
    return {"dataset": dataset.name, "shape": list(dataset.shape), "files": files}


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at ``path`` (None: absent or unreadable, e.g. a run made by psm 0.1)."""
    try:
        rec = json.loads(path.read_text())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def recorded_shape(manifest: dict[str, Any] | None) -> tuple[int, ...] | None:
    """The shape of one data point recorded in a manifest, if any."""
    shape = manifest.get("shape") if manifest else None
    return tuple(int(s) for s in shape) if isinstance(shape, list) else None


def check_data(manifest: dict[str, Any] | None, run_path: Path) -> None:
    """Refuse data files whose content changed since the run was created.

    Raises:
        DataError: one line naming the changed (or vanished) file.
    """
    if manifest is None:  # a run made by psm 0.1: nothing recorded to check against
        return
    for name, want in (manifest.get("files") or {}).items():
        p = Path(name)
        if not p.is_file():
            raise DataError(f"data file {p} of run {run_path} is gone; restore it to use this run")
        if file_digest(p, want) != want.get("sha256"):
            raise DataError(
                f"data file {p} changed since run {run_path} was created (its content "
                "digest differs); restore the file, or train on it with a new --out"
            )
