"""The image sources ``psm data prepare`` reads, each turned into a :class:`Plan`.

A plan is built by checking the user's files (every file present, every header readable)
without writing anything; its two :class:`Part` s then stream uint8 chunks ``[k, C, H, W]``
(the train split, then the test split). Nothing here downloads: a missing or incomplete source
is a one-line :class:`DataError` that says which files are expected where, and where they come
from.

Sources and splits:

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, levels 0..16, so 17 levels);
  a permutation by ``numpy.random.default_rng(0)``: its first 1438 are train, the last 359
  (20%) test.
* ``mnist``: the four official idx files (raw or ``.gz``); official 60k/10k split.
* ``cifar10``: ``cifar-10-batches-bin`` or ``cifar-10-batches-py``; ``data_batch_1..5`` /
  ``test_batch``.
* ``celeba64``: ``img_align_celeba/`` + ``list_eval_partition.txt``; train = partition 0,
  test = partition 2, the validation partition 1 is not used; 64x64 by
  :func:`~psm.data.formats.resize_crop`.
* ``imagenet64``: ``train_data_batch_1..10.npz`` / ``val_data.npz`` (downsampled ImageNet), or
  the folders ``train_64x64/`` / ``valid_64x64/`` of PNGs.
* ``folder``: every PNG/JPEG under a folder; a seeded random split (``test_fraction``, ``seed``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .base import DataError
from .formats import (
    CIFAR_RECORD,
    RESAMPLE,
    image_info,
    list_images,
    load_image,
    npz_header,
    npz_rows,
    read_cifar_bin,
    read_cifar_pickle,
    read_idx,
    read_partition,
)

SOURCES = ("digits", "mnist", "cifar10", "celeba64", "imagenet64", "folder")

DIGITS_SEED = 0  # seed of the fixed digits split
DIGITS_TEST_FRACTION = 0.2
DIGITS_LEVELS = 17  # sklearn digits hold 0..16
FOLDER_TEST_FRACTION = 0.1  # default share of a folder held out for testing
FOLDER_SEED = 0  # default seed of a folder's split
CELEBA_SIZE = 64
IMAGENET_SIZE = 64
IMAGENET_TRAIN_BATCHES = 10
NPZ_CHUNK_ROWS = 4096  # ~50 MB of ImageNet-64 rows per read
IMAGE_CHUNK = 256  # images decoded per thread-pool round

MNIST_URL = "http://yann.lecun.com/exdb/mnist/"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"
IMAGENET_URL = "https://image-net.org/download-images (Downsampled ImageNet 64x64)"

Chunks = Callable[[], Iterator[np.ndarray]]


@dataclass(frozen=True)
class Part:
    """One split of a source.

    Attributes:
        n: number of images.
        chunks: a fresh iterator of uint8 chunks ``[k, C, H, W]`` whose ``k`` sum to ``n``.
    """

    n: int
    chunks: Chunks


@dataclass
class Plan:
    """A checked source, ready to be written.

    Attributes:
        name: the dataset name recorded in ``meta.json``.
        shape: ``(C, H, W)``.
        levels: intensity levels L (values are 0..L-1).
        train, test: the two splits.
        split: how the split was made (``rule``, ``seed``, ``test_fraction``).
        files: source files read, ``{"path", "bytes"}`` (paths relative to the source).
        folders: image folders read, ``{"path", "images", "bytes", "listing_sha256"}``.
        options: conversion settings (size, resample filter, channels), if any.
    """

    name: str
    shape: tuple[int, int, int]
    levels: int
    train: Part
    test: Part
    split: dict[str, Any]
    files: list[dict[str, Any]] = field(default_factory=list)
    folders: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers
def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n)``: ``(train, test)`` index arrays.

    The permutation is ``numpy.random.default_rng(seed).permutation(n)``; its first
    ``n - n_test`` entries are train and the rest test, ``n_test = max(1, round(n * f))``.

    Raises:
        DataError: a fraction outside (0, 1) or fewer than 1 train and 1 test image.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    n_test = max(1, round(n * test_fraction))
    if n - n_test < 1:
        raise DataError(f"{n} image(s) are too few to hold out {n_test} for testing")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n - n_test], perm[n - n_test :]


def _one_chunk(arr: np.ndarray) -> Chunks:
    return lambda: iter([arr])


def _file_entry(path: Path, root: Path) -> dict[str, Any]:
    return {"path": path.relative_to(root).as_posix(), "bytes": path.stat().st_size}


def _folder_entry(folder: Path, paths: Sequence[Path], root: Path) -> dict[str, Any]:
    """Count, total size and a digest of the ``name<TAB>size`` listing of an image folder."""
    digest = hashlib.sha256()
    total = 0
    for p in paths:
        size = p.stat().st_size
        total += size
        digest.update(f"{p.relative_to(folder).as_posix()}\t{size}\n".encode())
    rel = folder.relative_to(root).as_posix() if folder != root else "."
    return {"path": rel, "images": len(paths), "bytes": total, "listing_sha256": digest.hexdigest()}


def _need_folder(path: Path | None, expected: str) -> Path:
    if path is None:
        raise DataError(f"needs --from PATH ({expected})")
    if path.is_file():
        raise DataError(f"{path} is a file, not a folder; unpack it first ({expected})")
    if not path.is_dir():
        raise DataError(f"{path} does not exist ({expected})")
    return path


def _image_chunks(
    paths: Sequence[Path], *, channels: int, size: int | None, shape: tuple[int, ...], workers: int
) -> Chunks:
    """Decode ``paths`` in order on ``workers`` threads (Pillow releases the GIL while
    decoding and resizing), ``IMAGE_CHUNK`` at a time; every image must come out ``shape``."""

    def load(p: Path) -> np.ndarray:
        arr = load_image(p, channels=channels, size=size)
        if arr.shape != shape:
            raise DataError(
                f"{p} is {arr.shape[2]}x{arr.shape[1]}, the first image is {shape[2]}x{shape[1]}; "
                "pass --size N to resize and centre-crop every image to NxN"
            )
        return arr

    def chunks() -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for i in range(0, len(paths), IMAGE_CHUNK):
                yield np.stack(list(pool.map(load, paths[i : i + IMAGE_CHUNK])))

    return chunks


def _resize_options(size: int | None, channels: int) -> dict[str, Any]:
    opts: dict[str, Any] = {"channels": channels, "size": size}
    if size is not None:
        opts["resize"] = f"shorter side to {size} with PIL {RESAMPLE.name}, then centre crop"
    return opts


# --------------------------------------------------------------------------- digits
def digits_file() -> Path:
    """The file scikit-learn's ``load_digits`` reads (``sklearn/datasets/data/digits.csv.gz``)."""
    return Path(str(resources.files("sklearn.datasets.data") / "digits.csv.gz"))


def digits_split() -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The bundled digits as uint8 levels 0..16: ``(train [1438, 1, 8, 8], test [359, 1, 8, 8],
    split)`` by the fixed seeded split described in the module docstring."""
    from sklearn.datasets import load_digits

    images = load_digits().images  # [1797, 8, 8] float64, integers 0..16
    levels = np.rint(images).astype(np.uint8)[:, None]
    train, test = split_indices(len(levels), DIGITS_TEST_FRACTION, DIGITS_SEED)
    split = {
        "rule": "numpy default_rng(seed).permutation(1797): first 80% train, last 20% test",
        "seed": DIGITS_SEED,
        "test_fraction": DIGITS_TEST_FRACTION,
    }
    return levels[train], levels[test], split


def _plan_digits(path: Path | None, **_: Any) -> Plan:
    if path is not None:
        raise DataError("the set is bundled with scikit-learn; drop --from")
    train, test, split = digits_split()
    f = digits_file()
    return Plan(
        name="digits",
        shape=(1, 8, 8),
        levels=DIGITS_LEVELS,
        train=Part(len(train), _one_chunk(train)),
        test=Part(len(test), _one_chunk(test)),
        split=split,
        files=[{"path": f.as_posix(), "bytes": f.stat().st_size}],
    )


# --------------------------------------------------------------------------- MNIST
MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _plan_mnist(path: Path | None, **_: Any) -> Plan:
    expected = f"expected the four MNIST idx files from {MNIST_URL}"
    root = _need_folder(path, expected)
    found: dict[str, Path] = {}
    for name in MNIST_FILES:
        for candidate in (root / name, root / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            raise DataError(f"{root} has no {name}[.gz] ({expected})")
    arrays = {name: read_idx(p) for name, p in found.items()}
    parts = []
    for stem in ("train", "t10k"):
        images, labels = arrays[f"{stem}-images-idx3-ubyte"], arrays[f"{stem}-labels-idx1-ubyte"]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(
                f"{found[f'{stem}-images-idx3-ubyte']}: images are {images.shape}, "
                "expected [N, 28, 28]"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"{found[f'{stem}-labels-idx1-ubyte']}: {labels.size} labels for "
                f"{len(images)} images"
            )
        parts.append(Part(len(images), _one_chunk(images[:, None])))
    return Plan(
        name="mnist",
        shape=(1, 28, 28),
        levels=256,
        train=parts[0],
        test=parts[1],
        split={"rule": "official: train-images (train) / t10k-images (test)", "seed": None},
        files=[_file_entry(p, root) for p in found.values()],
    )


# --------------------------------------------------------------------------- CIFAR-10
def _cifar_layout(root: Path) -> tuple[Path, str]:
    """``(folder, "bin" | "py")`` of the CIFAR-10 batches at or under ``root``."""
    for folder in (root, root / "cifar-10-batches-bin", root / "cifar-10-batches-py"):
        if (folder / "data_batch_1.bin").is_file() or (folder / "test_batch.bin").is_file():
            return folder, "bin"
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            return folder, "py"
    raise DataError(
        f"{root} has no data_batch_1.bin or data_batch_1 (expected cifar-10-batches-bin/ "
        "with data_batch_1..5.bin and test_batch.bin, or cifar-10-batches-py/ with "
        f"data_batch_1..5 and test_batch, from {CIFAR_URL})"
    )


def _plan_cifar10(path: Path | None, **_: Any) -> Plan:
    expected = f"expected cifar-10-batches-bin/ or cifar-10-batches-py/ from {CIFAR_URL}"
    root = _need_folder(path, expected)
    folder, kind = _cifar_layout(root)
    suffix = ".bin" if kind == "bin" else ""
    names = [f"data_batch_{i}{suffix}" for i in range(1, 6)] + [f"test_batch{suffix}"]
    paths = [folder / n for n in names]
    for p in paths:
        if not p.is_file():
            raise DataError(
                f"{folder} has no {p.name} (expected data_batch_1..5{suffix} and "
                f"test_batch{suffix} of the CIFAR-10 {'binary' if suffix else 'python'} "
                f"version from {CIFAR_URL})"
            )
    if kind == "bin":
        counts = []
        for p in paths:
            size = p.stat().st_size
            if size == 0 or size % CIFAR_RECORD:
                raise DataError(
                    f"{p}: {size} bytes is not a whole number of {CIFAR_RECORD}-byte "
                    "CIFAR-10 records"
                )
            counts.append(size // CIFAR_RECORD)

        def train_chunks() -> Iterator[np.ndarray]:
            return (read_cifar_bin(p) for p in paths[:5])

        train = Part(sum(counts[:5]), train_chunks)
        test = Part(counts[5], lambda: iter([read_cifar_bin(paths[5])]))
    else:
        batches = [read_cifar_pickle(p) for p in paths]  # all checked before anything is written
        train = Part(sum(len(b) for b in batches[:5]), lambda: iter(batches[:5]))
        test = Part(len(batches[5]), _one_chunk(batches[5]))
    return Plan(
        name="cifar10",
        shape=(3, 32, 32),
        levels=256,
        train=train,
        test=test,
        split={"rule": "official: data_batch_1..5 (train) / test_batch (test)", "seed": None},
        files=[_file_entry(p, root) for p in paths],
        options={"format": f"cifar-10 {'binary' if kind == 'bin' else 'python'} version"},
    )


# --------------------------------------------------------------------------- CelebA
def _find(root: Path, *candidates: str) -> Path | None:
    return next((root / c for c in candidates if (root / c).exists()), None)


def _plan_celeba64(path: Path | None, *, workers: int, **_: Any) -> Plan:
    expected = f"expected img_align_celeba/ (JPEGs) and list_eval_partition.txt from {CELEBA_URL}"
    root = _need_folder(path, expected)
    images = _find(root, "img_align_celeba", "Img/img_align_celeba")
    if images is None or not images.is_dir():
        raise DataError(f"{root} has no img_align_celeba/ ({expected})")
    part_file = _find(root, "list_eval_partition.txt", "Eval/list_eval_partition.txt")
    if part_file is None:
        raise DataError(f"{root} has no list_eval_partition.txt ({expected})")
    rows = read_partition(part_file)
    present = {e.name for e in os.scandir(images) if e.is_file()}
    missing = [name for name, _ in rows if name not in present]
    if missing:
        raise DataError(
            f"{images} has no {missing[0]} ({len(missing)} of the {len(rows)} images listed in "
            f"{part_file.name} are missing; {expected})"
        )
    train = [images / name for name, s in rows if s == 0]
    test = [images / name for name, s in rows if s == 2]
    if not train or not test:
        raise DataError(f"{part_file}: no images in partition {0 if not train else 2}")
    shape = (3, CELEBA_SIZE, CELEBA_SIZE)
    opts = {"channels": 3, "size": CELEBA_SIZE, "shape": shape, "workers": workers}
    return Plan(
        name="celeba64",
        shape=shape,
        levels=256,
        train=Part(len(train), _image_chunks(train, **opts)),
        test=Part(len(test), _image_chunks(test, **opts)),
        split={
            "rule": "list_eval_partition.txt: train = partition 0, test = partition 2 "
            "(validation partition 1 unused)",
            "seed": None,
        },
        files=[_file_entry(part_file, root)],
        folders=[_folder_entry(images, train + test, root)],
        options=_resize_options(CELEBA_SIZE, 3),
    )


# --------------------------------------------------------------------------- ImageNet-64
def _locate(root: Path, name: str) -> Path | None:
    """``name`` in ``root`` or one of its direct subfolders (the train archive comes in two
    parts that may be unpacked side by side)."""
    if (root / name).is_file():
        return root / name
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if (sub / name).is_file():
            return sub / name
    return None


def _plan_imagenet64(path: Path | None, *, workers: int, **_: Any) -> Plan:
    expected = (
        f"expected train_data_batch_1..{IMAGENET_TRAIN_BATCHES}.npz and val_data.npz, or the "
        f"folders train_64x64/ and valid_64x64/, from {IMAGENET_URL}"
    )
    root = _need_folder(path, expected)
    if (root / "train_64x64").is_dir() or (root / "valid_64x64").is_dir():
        return _plan_imagenet64_folders(root, expected, workers)
    names = [f"train_data_batch_{i}.npz" for i in range(1, IMAGENET_TRAIN_BATCHES + 1)]
    names.append("val_data.npz")
    paths = []
    for name in names:
        p = _locate(root, name)
        if p is None:
            raise DataError(f"{root} has no {name} ({expected})")
        paths.append(p)
    width = 3 * IMAGENET_SIZE * IMAGENET_SIZE
    counts = []
    for p in paths:
        shape, dtype = npz_header(p, "data")
        if dtype != np.uint8 or len(shape) != 2 or shape[1] != width:
            raise DataError(f"{p}: 'data' is {dtype} {list(shape)}, expected uint8 [N, {width}]")
        counts.append(shape[0])

    def stream(ps: Sequence[Path]) -> Chunks:
        def chunks() -> Iterator[np.ndarray]:
            for p in ps:
                for rows in npz_rows(p, "data", NPZ_CHUNK_ROWS):
                    yield rows.reshape(-1, 3, IMAGENET_SIZE, IMAGENET_SIZE)

        return chunks

    return Plan(
        name="imagenet64",
        shape=(3, IMAGENET_SIZE, IMAGENET_SIZE),
        levels=256,
        train=Part(sum(counts[:-1]), stream(paths[:-1])),
        test=Part(counts[-1], stream(paths[-1:])),
        split={"rule": "official: train_data_batch_1..10 (train) / val_data (test)", "seed": None},
        files=[_file_entry(p, root) for p in paths],
        options={"format": "downsampled ImageNet 64x64 npz ('data' [N, 12288] CHW rows)"},
    )


def _plan_imagenet64_folders(root: Path, expected: str, workers: int) -> Plan:
    parts, folders = [], []
    shape = (3, IMAGENET_SIZE, IMAGENET_SIZE)
    for sub in ("train_64x64", "valid_64x64"):
        folder = root / sub
        paths = list_images(folder) if folder.is_dir() else []
        if not paths:
            raise DataError(f"{root} has no images in {sub}/ ({expected})")
        opts = {"channels": 3, "size": IMAGENET_SIZE, "shape": shape, "workers": workers}
        parts.append(Part(len(paths), _image_chunks(paths, **opts)))
        folders.append(_folder_entry(folder, paths, root))
    return Plan(
        name="imagenet64",
        shape=shape,
        levels=256,
        train=parts[0],
        test=parts[1],
        split={"rule": "official: train_64x64/ (train) / valid_64x64/ (test)", "seed": None},
        folders=folders,
        options=_resize_options(IMAGENET_SIZE, 3),
    )


# --------------------------------------------------------------------------- any folder
def _plan_folder(
    path: Path | None,
    *,
    size: int | None,
    channels: int | None,
    test_fraction: float,
    seed: int,
    workers: int,
) -> Plan:
    root = _need_folder(path, "a folder of PNG/JPEG images")
    paths = list_images(root)
    if not paths:
        raise DataError(f"{root} has no .png/.jpg/.jpeg files (searched recursively)")
    (w, h), first_channels = image_info(paths[0])
    channels = channels or first_channels
    shape = (channels, size, size) if size is not None else (channels, h, w)
    train_idx, test_idx = split_indices(len(paths), test_fraction, seed)
    opts = {"channels": channels, "size": size, "shape": shape, "workers": workers}
    return Plan(
        name="folder",
        shape=shape,
        levels=256,
        train=Part(len(train_idx), _image_chunks([paths[i] for i in train_idx], **opts)),
        test=Part(len(test_idx), _image_chunks([paths[i] for i in test_idx], **opts)),
        split={
            "rule": "numpy default_rng(seed).permutation of the files sorted by path: "
            "first (1 - test_fraction) train, rest test",
            "seed": seed,
            "test_fraction": test_fraction,
        },
        folders=[_folder_entry(root, paths, root)],
        options=_resize_options(size, channels),
    )


PLANNERS: dict[str, Callable[..., Plan]] = {
    "digits": _plan_digits,
    "mnist": _plan_mnist,
    "cifar10": _plan_cifar10,
    "celeba64": _plan_celeba64,
    "imagenet64": _plan_imagenet64,
    "folder": _plan_folder,
}


def plan_source(
    source: str,
    path: str | Path | None,
    *,
    size: int | None = None,
    channels: int | None = None,
    test_fraction: float | None = None,
    seed: int | None = None,
    workers: int = 4,
) -> Plan:
    """Check a source's files and plan its conversion (nothing is written).

    Args:
        source: one of :data:`SOURCES`.
        path: the folder holding the source's files (``None`` for ``digits``).
        size, channels, test_fraction, seed: ``folder`` only (see ``psm data prepare``);
            ``None`` keeps the defaults: the images' own size and channels, a test fraction
            of :data:`FOLDER_TEST_FRACTION` and seed :data:`FOLDER_SEED`.
        workers: threads that decode image files.

    Raises:
        DataError: one line, prefixed by the source name.
    """
    if source not in PLANNERS:
        raise DataError(f"unknown image source {source!r} (choose from {', '.join(SOURCES)})")
    folder_only = {"size": size, "channels": channels, "test-fraction": test_fraction, "seed": seed}
    used = [k for k, v in folder_only.items() if v is not None]
    if source != "folder" and used:
        raise DataError(f"{source}: --{used[0]} applies to the folder source only")
    if size is not None and size < 1:
        raise DataError(f"{source}: --size must be >= 1, got {size}")
    if channels not in (None, 1, 3):
        raise DataError(f"{source}: --channels must be 1 or 3, got {channels}")
    try:
        return PLANNERS[source](
            Path(path) if path is not None else None,
            size=size,
            channels=channels,
            test_fraction=FOLDER_TEST_FRACTION if test_fraction is None else test_fraction,
            seed=FOLDER_SEED if seed is None else seed,
            workers=workers,
        )
    except DataError as e:
        raise DataError(f"{source}: {e}") from None
    except OSError as e:  # e.g. a permission error while listing
        raise DataError(f"{source}: {' '.join(str(e).split())}") from None
