"""Convert an image source once into a prepared directory that training memory-maps.

Layout of a prepared directory (format tag :data:`FORMAT`)::

    DIR/
      train.npy        uint8   [n_train, C, H, W]   raw levels k in 0..L-1
      test.npy         uint8   [n_test, C, H, W]
      train_mean.npy   float64 [C, H, W]            mean of k over the train split
      meta.json        format, name, shape, dtype, levels, n_train, n_test, split, provenance

``meta.json`` holds ``format`` (``"psm-images/1"``), ``name``, ``shape`` ``[C, H, W]``,
``dtype`` (``"uint8"``), ``levels`` L, ``n_train``, ``n_test``, ``split`` (``rule``,
``seed``, and ``test_fraction`` where random) and ``provenance`` (``kind``, ``path``,
``files`` ``[{path, bytes}]``, ``folders`` ``[{path, images, bytes, listing_sha256}]``,
``options``, ``psm_version``, ``created``).

:func:`prepare` writes into a hidden sibling folder (``.DIR.partial-XXXX``) and renames it to
``DIR`` only when every file is complete, so a killed conversion never leaves a directory
that looks prepared; an existing non-empty ``DIR`` is refused before anything is read.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .base import DataError
from .sources import Part, Plan, plan_source

FORMAT = "psm-images/1"
TRAIN_FILE = "train.npy"
TEST_FILE = "test.npy"
MEAN_FILE = "train_mean.npy"
META_FILE = "meta.json"
DATA_FILES = (TRAIN_FILE, TEST_FILE, MEAN_FILE, META_FILE)
META_KEYS = ("format", "name", "shape", "dtype", "levels", "n_train", "n_test", "split")


def psm_version() -> str:
    """The installed psm version, or ``"unknown"``."""
    try:
        return metadata.version("psm")
    except metadata.PackageNotFoundError:
        return "unknown"


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file or a non-empty directory (nothing is touched)."""
    if out.is_dir():
        if any(out.iterdir()):
            raise DataError(f"--out {out} exists and is not empty; choose a new folder")
    elif out.exists() or out.is_symlink():
        raise DataError(f"--out {out} exists and is not a folder")


def _check_space(parent: Path, plan: Plan) -> None:
    need = (plan.train.n + plan.test.n) * int(np.prod(plan.shape))
    free = shutil.disk_usage(parent).free
    if need > free:
        raise DataError(
            f"{plan.name} needs {need / 1e9:.2f} GB in {parent}, only {free / 1e9:.2f} GB free"
        )


def _write_part(
    path: Path, part: Part, plan: Plan, bar: Any, *, with_sum: bool
) -> np.ndarray | None:
    """Stream ``part`` into a new ``.npy`` memmap; the int64 per-pixel sum when ``with_sum``."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(part.n, *plan.shape))
    total = np.zeros(plan.shape, dtype=np.int64) if with_sum else None
    pos = 0
    for chunk in part.chunks():
        if chunk.dtype != np.uint8 or chunk.shape[1:] != plan.shape:
            raise DataError(
                f"internal: a chunk {chunk.dtype} {chunk.shape} is not uint8 {plan.shape}"
            )
        if pos + len(chunk) > part.n:
            raise DataError(f"the source holds more than the {part.n} images it announced")
        if plan.levels < 256 and len(chunk) and int(chunk.max()) >= plan.levels:
            raise DataError(f"a value {int(chunk.max())} is outside the {plan.levels} levels")
        out[pos : pos + len(chunk)] = chunk
        if total is not None:
            total += chunk.sum(axis=0, dtype=np.int64)
        pos += len(chunk)
        bar.update(len(chunk))
    if pos != part.n:
        raise DataError(f"the source held {pos} images, not the {part.n} it announced")
    out.flush()
    del out
    return total


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _meta(plan: Plan, source_path: Path | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "name": plan.name,
        "shape": list(plan.shape),
        "dtype": "uint8",
        "levels": plan.levels,
        "n_train": plan.train.n,
        "n_test": plan.test.n,
        "split": plan.split,
        "provenance": {
            "kind": plan.name,
            "path": str(source_path.resolve()) if source_path is not None else None,
            "files": plan.files,
            "folders": plan.folders,
            "options": plan.options,
            "psm_version": psm_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }


def write_prepared(plan: Plan, out: Path, source_path: Path | None, *, progress: bool) -> dict:
    """Write a checked plan to ``out`` atomically (temporary sibling + rename).

    Returns:
        the ``meta.json`` contents.
    """
    from ..progress import make_bar

    out.parent.mkdir(parents=True, exist_ok=True)
    _check_space(out.parent, plan)
    tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    tmp.mkdir()  # hidden, and not the final name: never mistaken for a prepared directory
    try:
        total = plan.train.n + plan.test.n
        with make_bar(total, unit="img", desc=f"prepare {plan.name}", disable=not progress) as bar:
            sums = _write_part(tmp / TRAIN_FILE, plan.train, plan, bar, with_sum=True)
            _write_part(tmp / TEST_FILE, plan.test, plan, bar, with_sum=False)
        assert sums is not None
        np.save(tmp / MEAN_FILE, sums / plan.train.n)
        meta = _meta(plan, source_path)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        for name in DATA_FILES:
            _fsync(tmp / name)
        check_out(out)  # someone may have filled it meanwhile
        if out.is_dir():
            out.rmdir()  # an empty folder the user made for us
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def prepare(
    source: str,
    path: str | Path | None,
    out: str | Path,
    *,
    size: int | None = None,
    channels: int | None = None,
    test_fraction: float | None = None,
    seed: int | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Convert ``source`` read from ``path`` into the prepared directory ``out``.

    Args:
        source: ``digits``, ``mnist``, ``cifar10``, ``celeba64``, ``imagenet64`` or ``folder``.
        path: the folder with the source's files (``None`` for ``digits``).
        out: the directory to create; must not exist or be empty.
        size, channels, test_fraction, seed: ``folder`` only (see
            :func:`psm.data.sources.plan_source`).
        workers: threads decoding image files (default: up to 8, one per CPU).
        progress: show a progress bar on stderr.

    Returns:
        the ``meta.json`` contents.

    Raises:
        DataError: one line; ``out`` is left as it was.
    """
    out = Path(out)
    check_out(out)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    elif workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    plan = plan_source(
        source,
        path,
        size=size,
        channels=channels,
        test_fraction=test_fraction,
        seed=seed,
        workers=workers,
    )
    try:
        return write_prepared(
            plan, out, Path(path) if path is not None else None, progress=progress
        )
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    except OSError as e:
        raise DataError(f"{source}: writing {out} failed ({' '.join(str(e).split())})") from None


def read_meta(root: str | Path) -> dict[str, Any]:
    """The checked ``meta.json`` of a prepared directory.

    Raises:
        DataError: missing directory or file, unreadable JSON, a foreign format tag, or a
            missing/ill-typed key.
    """
    root = Path(root)
    path = root / META_FILE
    if not root.is_dir():
        raise DataError(f"{root} is not a prepared image directory (no such folder)")
    if not path.is_file():
        raise DataError(
            f"{root} has no {META_FILE}; make it with: psm data prepare SOURCE --out DIR"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable ({' '.join(str(e).split())})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        tag = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{path}: format {tag!r} is not {FORMAT!r}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise DataError(f"{path}: no {missing[0]!r}")
    shape = meta["shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(_posint(s) for s in shape)):
        raise DataError(f"{path}: shape {shape!r} is not [C, H, W]")
    if not (_posint(meta["levels"]) and 2 <= meta["levels"] <= 256):
        raise DataError(f"{path}: levels {meta['levels']!r} is not an integer in 2..256")
    for key in ("n_train", "n_test"):
        if not _posint(meta[key]):
            raise DataError(f"{path}: {key} {meta[key]!r} is not a positive integer")
    if meta["dtype"] != "uint8":
        raise DataError(f"{path}: dtype {meta['dtype']!r} is not 'uint8'")
    return meta


def _posint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0
