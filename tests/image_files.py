"""Writers of tiny files in the real on-disk formats of the image sources, for the tests.

Each writer follows the published layout (not psm's reader), so a test that prepares these
files checks psm against the format, not against itself.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def rng_images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random uint8 images ``[n, *shape]``."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


# --------------------------------------------------------------------------- MNIST
def write_idx(path: Path, arr: np.ndarray) -> Path:
    """An IDX file of unsigned bytes: magic ``00 00 08 ndim``, big-endian int32 dims, data.
    Gzipped when ``path`` ends in ``.gz``."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if path.suffix == ".gz":
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def write_mnist(root: Path, train: np.ndarray, test: np.ndarray, *, gz: bool) -> None:
    """The four MNIST files for images ``[N, 28, 28]`` (labels ``i % 10``)."""
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for stem, images in (("train", train), ("t10k", test)):
        write_idx(root / f"{stem}-images-idx3-ubyte{ext}", images)
        write_idx(root / f"{stem}-labels-idx1-ubyte{ext}", np.arange(len(images)) % 10)


# --------------------------------------------------------------------------- CIFAR-10
def write_cifar_bin(path: Path, images: np.ndarray) -> Path:
    """A binary batch: per image 1 label byte then 3072 bytes (R plane, G plane, B plane)."""
    labels = (np.arange(len(images)) % 10).astype(np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
    path.write_bytes(records.tobytes())
    return path


def _batch_dict(images: np.ndarray, name: str) -> dict[bytes, object]:
    n = len(images)
    return {
        b"batch_label": name.encode(),
        b"labels": [int(i % 10) for i in range(n)],
        b"data": images.reshape(n, -1).copy(),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_cifar_py(path: Path, images: np.ndarray) -> Path:
    """A python-version batch as Python 3 would write it (protocol 2, bytes keys)."""
    path.write_bytes(pickle.dumps(_batch_dict(images, path.name), protocol=2))
    return path


def _str(b: bytes) -> bytes:
    """A Python 2 ``str`` (BINSTRING / SHORT_BINSTRING)."""
    if len(b) < 256:
        return b"U" + bytes([len(b)]) + b
    return b"T" + struct.pack("<i", len(b)) + b


def _int(i: int) -> bytes:
    return b"K" + bytes([i]) if 0 <= i < 256 else b"J" + struct.pack("<i", i)


def write_cifar_py2(path: Path, images: np.ndarray) -> Path:
    """A python-version batch as the real files are: a Python 2 (cPickle, protocol 2) dict of
    ``str`` keys whose ``data`` is a numpy array pickled by ``numpy.core.multiarray``."""
    n = len(images)
    data = images.reshape(n, -1).tobytes()
    dtype = b"cnumpy\ndtype\n" + _str(b"u1") + _int(0) + _int(1) + b"\x87R"
    dtype += b"(" + _int(3) + _str(b"|") + b"NNN" + _int(-1) + _int(-1) + _int(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n"
    array += _int(0) + b"\x85" + _str(b"b") + b"\x87R"
    array += b"(" + _int(1) + b"M" + struct.pack("<H", n) + b"M" + struct.pack("<H", 3072)
    array += b"\x86" + dtype + b"\x89" + _str(data) + b"tb"
    labels = b"](" + b"".join(_int(i % 10) for i in range(n)) + b"e"
    names = b"](" + b"".join(_str(f"img_{i}.png".encode()) for i in range(n)) + b"e"
    body = _str(b"batch_label") + _str(path.name.encode()) + _str(b"labels") + labels
    body += _str(b"data") + array + _str(b"filenames") + names
    path.write_bytes(b"\x80\x02}(" + body + b"u.")
    return path


class _RunsShell:
    """Unpickling this calls ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_evil_pickle(path: Path, marker: Path) -> Path:
    """A pickle that would run ``touch marker`` through ``os.system`` when loaded naively."""
    path.write_bytes(pickle.dumps({b"data": _RunsShell(f"touch {marker}")}, protocol=2))
    return path


# --------------------------------------------------------------------------- CelebA
def write_celeba(root: Path, images: list[np.ndarray], partitions: list[int]) -> list[str]:
    """``img_align_celeba/NNNNNN.jpg`` (HWC RGB arrays, quality 95) and
    ``list_eval_partition.txt`` (``NAME SPLIT`` lines); returns the file names."""
    folder = root / "img_align_celeba"
    folder.mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(images))]
    for name, im in zip(names, images):
        Image.fromarray(im).save(folder / name, quality=95)
    lines = [f"{name} {p}\n" for name, p in zip(names, partitions)]
    (root / "list_eval_partition.txt").write_text("".join(lines))
    return names


# --------------------------------------------------------------------------- ImageNet-64
def write_imagenet_npz(path: Path, images: np.ndarray, *, compressed: bool) -> Path:
    """A downsampled-ImageNet batch: ``data`` uint8 ``[N, 12288]`` (CHW rows), ``labels``
    (1..1000) and ``mean`` (float)."""
    n = len(images)
    save = np.savez_compressed if compressed else np.savez
    data = images.reshape(n, -1)
    save(path, data=data, labels=np.arange(1, n + 1), mean=data.mean(axis=0))
    return path


# --------------------------------------------------------------------------- PNG folder
def write_png(path: Path, image: np.ndarray) -> Path:
    """A PNG of an ``[H, W]`` (grey) or ``[H, W, 3]`` (RGB) uint8 array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
