"""Readers of the standard on-disk image formats, with numpy and Pillow only.

Each reader returns uint8 pixels in channel-first order and raises :class:`DataError` with one
line naming the file when the file is missing, truncated or not in the expected format:

* :func:`read_idx`: MNIST's IDX files (``*-idx3-ubyte``, raw or ``.gz``).
* :func:`read_cifar_bin`: CIFAR-10 binary batches (records of 1 label byte + 3072 CHW bytes).
* :func:`read_cifar_pickle`: CIFAR-10 "python version" batches, through
  :class:`RestrictedUnpickler`, which builds numpy arrays and plain builtins and refuses every
  other global (so a malicious pickle cannot run code).
* :func:`npz_rows` / :func:`npz_header`: one array of an ``.npz`` archive, streamed in row
  chunks without loading the whole member (ImageNet-64 batches are ~1.5 GB each).
* :func:`read_partition`: CelebA's ``list_eval_partition.txt``.
* :func:`list_images` / :func:`load_image`: PNG/JPEG files, resized so the shorter side is
  ``size`` with :data:`RESAMPLE` (Lanczos) and centre-cropped to ``size x size``.
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .base import DataError

IDX_UBYTE = 0x08
CIFAR_SIDE = 32
CIFAR_RECORD = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE  # label byte + CHW pixels
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
RESAMPLE = Image.Resampling.LANCZOS  # the resize filter of every image source
GREY_MODES = ("1", "L", "LA")  # Pillow modes read as one channel by default
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # >8-bit modes, refused


def one_line(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split()) or type(e).__name__


# --------------------------------------------------------------------------- MNIST idx
def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST), raw or gzipped (``.gz`` suffix).

    Args:
        path: e.g. ``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``.

    Returns:
        uint8 array with the file's dimensions, e.g. ``[60000, 28, 28]`` for images and
        ``[60000]`` for labels.

    Raises:
        DataError: unreadable file, bad magic number, element type other than ubyte, or a
            payload whose length does not match the header.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({one_line(e)})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != IDX_UBYTE:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    want = int(np.prod(dims, dtype=np.int64))
    if len(raw) - head != want:
        raise DataError(
            f"{path}: IDX header says {'x'.join(map(str, dims))} = {want} bytes of data, "
            f"the file holds {len(raw) - head}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(dims)


# --------------------------------------------------------------------------- CIFAR-10 binary
def read_cifar_bin(path: Path) -> np.ndarray:
    """A CIFAR-10 binary batch: ``[N, 3, 32, 32]`` uint8 (labels are skipped).

    Raises:
        DataError: unreadable file, or a size that is not a whole number of 3073-byte records.
    """
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({one_line(e)})") from None
    if raw.size == 0 or raw.size % CIFAR_RECORD:
        raise DataError(
            f"{path}: {raw.size} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 "
            "records (1 label byte + 3072 pixel bytes)"
        )
    records = raw.reshape(-1, CIFAR_RECORD)
    return records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).copy()


# --------------------------------------------------------------------------- restricted pickle
def _numpy_core(module: str) -> Any:
    """``numpy._core.<module>`` (numpy 2) or ``numpy.core.<module>`` (numpy 1)."""
    try:
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{module}")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only globals a data pickle may name: numpy array/dtype/scalar rebuilders and plain
    builtin types (no function that reaches the file system, the shell or ``eval``)."""
    import codecs

    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles from Python 3 hold bytes
    }
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    plain = (bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset)
    for module in ("builtins", "__builtin__"):
        for t in plain:
            allowed[(module, t.__name__)] = t
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and builtins only.

    Any other global in the stream (``os.system``, ``builtins.eval``, a class of some
    package, ...) stops the load with a :class:`DataError` before it is called.

    Args:
        file: binary stream of the pickle.
        source: the file name, for error messages.
    """

    def __init__(self, file: IO[bytes], source: Path) -> None:
        super().__init__(file, encoding="bytes")  # Python 2 str -> bytes, as CIFAR's own loader
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._source}: the pickle asks for {module}.{name}; psm unpickles only numpy "
                "arrays and plain builtins, so it was refused (nothing was run)"
            ) from None


def restricted_load(path: Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`.

    Raises:
        DataError: unreadable file, a refused global, or a malformed pickle.
    """
    try:
        with path.open("rb") as f:
            return RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        struct.error,
    ) as e:
        raise DataError(f"{path}: not a readable pickle ({one_line(e)})") from None


def read_cifar_pickle(path: Path) -> np.ndarray:
    """A CIFAR-10 "python version" batch: ``[N, 3, 32, 32]`` uint8.

    The file is a pickled dict whose ``b'data'`` is a uint8 array ``[N, 3072]`` (CHW rows);
    ``b'labels'``, ``b'batch_label'`` and ``b'filenames'`` are ignored.

    Raises:
        DataError: see :func:`restricted_load`; also no ``data`` entry or a wrong array.
    """
    obj = restricted_load(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    data = obj.get(b"data", obj.get("data"))
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path}: the pickled dict has no numpy array under 'data'")
    width = CIFAR_RECORD - 1
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != width:
        raise DataError(
            f"{path}: 'data' is {data.dtype} {list(data.shape)}, expected uint8 [N, {width}]"
        )
    return np.ascontiguousarray(data).reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE)


# --------------------------------------------------------------------------- npz streaming
def _open_member(path: Path, key: str) -> tuple[zipfile.ZipFile, IO[bytes]]:
    """The open archive and its member ``key.npy``."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz archive ({one_line(e)})") from None
    try:
        return archive, archive.open(f"{key}.npy")
    except KeyError:
        archive.close()
        raise DataError(f"{path}: the archive has no array {key!r}") from None


def _read_header(f: IO[bytes], path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the ``.npy`` header at the start of ``f``; refuses object arrays
    (they would need unpickling) and Fortran order."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(
            f"{path}: array {key!r} has no readable .npy header ({one_line(e)})"
        ) from None
    if dtype.hasobject:
        raise DataError(
            f"{path}: array {key!r} is an object (pickled) array, which psm never loads"
        )
    if fortran:
        raise DataError(f"{path}: array {key!r} is in Fortran order; expected C order")
    return tuple(int(s) for s in shape), dtype


def npz_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of array ``key`` in the ``.npz`` at ``path``, without reading its data.

    Raises:
        DataError: missing or unreadable archive or member, object array.
    """
    archive, f = _open_member(path, key)
    with archive, f:
        return _read_header(f, path, key)


def npz_rows(path: Path, key: str, chunk: int) -> Iterator[np.ndarray]:
    """Stream array ``key`` of an ``.npz`` in chunks of at most ``chunk`` rows.

    Works for stored and deflated members alike; memory is one chunk.

    Yields:
        arrays ``[k, *shape[1:]]`` of the member's dtype, in order.

    Raises:
        DataError: unreadable archive, or a member shorter than its header says.
    """
    archive, f = _open_member(path, key)
    with archive, f:
        shape, dtype = _read_header(f, path, key)
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        done = 0
        while done < shape[0]:
            k = min(chunk, shape[0] - done)
            try:
                buf = f.read(k * row_bytes)
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                raise DataError(f"{path}: cannot read array {key!r} ({one_line(e)})") from None
            if len(buf) != k * row_bytes:
                raise DataError(
                    f"{path}: array {key!r} is truncated after {done + len(buf) // row_bytes} "
                    f"of {shape[0]} rows"
                )
            yield np.frombuffer(buf, dtype=dtype).reshape(k, *row_shape)
            done += k


# --------------------------------------------------------------------------- CelebA partition
def read_partition(path: Path) -> list[tuple[str, int]]:
    """CelebA's ``list_eval_partition.txt``: ``(file name, split)`` per line, split 0/1/2.

    Raises:
        DataError: unreadable file, a line that is not ``NAME SPLIT``, or no lines.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({one_line(e)})") from None
    rows: list[tuple[str, int]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(
                f"{path}: line {lineno} is not 'IMAGE SPLIT' with SPLIT 0, 1 or 2: {line[:60]!r}"
            )
        rows.append((fields[0], int(fields[1])))
    if not rows:
        raise DataError(f"{path}: no images listed")
    return rows


# --------------------------------------------------------------------------- image files
def list_images(root: Path) -> list[Path]:
    """Every PNG/JPEG file under ``root`` (recursive), sorted by relative path.

    Hidden files and folders (names starting with ``.``, e.g. macOS ``._x.jpg``) are skipped;
    folder links are not followed.
    """
    found: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append(Path(folder, name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({one_line(e)})") from None


def image_info(path: Path) -> tuple[tuple[int, int], int]:
    """``((width, height), channels)`` of an image file from its header; channels is 1 for
    grey modes (``1``, ``L``, ``LA``), else 3.

    Raises:
        DataError: unreadable image.
    """
    with _open(path) as im:
        return im.size, 1 if im.mode in GREY_MODES else 3


def resize_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (:data:`RESAMPLE`), then centre-crop to square.

    The longer side becomes ``round(long * size / short)``; an image whose shorter side is
    already ``size`` is only cropped. The crop keeps ``(long - size) // 2`` pixels before.
    """
    w, h = im.size
    if min(w, h) != size:
        if w <= h:
            w, h = size, max(size, round(h * size / w))
        else:
            w, h = max(size, round(w * size / h)), size
        im = im.resize((w, h), resample=RESAMPLE)
    left, top = (w - size) // 2, (h - size) // 2
    if (w, h) != (size, size):
        im = im.crop((left, top, left + size, top + size))
    return im


def load_image(path: Path, *, channels: int, size: int | None) -> np.ndarray:
    """Decode one image to uint8 ``[C, H, W]``.

    EXIF orientation is applied; the image is converted to ``L`` (``channels=1``) or ``RGB``
    (``channels=3``; an alpha channel is dropped); then, when ``size`` is given, resized and
    centre-cropped by :func:`resize_crop`.

    Raises:
        DataError: unreadable or truncated image, or a 16-bit/float image (psm keeps 256
            levels and does not quantize them silently).
    """
    with _open(path) as im:
        if im.mode in WIDE_MODES:
            raise DataError(
                f"{path}: {im.mode} images (more than 8 bits per channel) are not supported; "
                "convert them to 8-bit first"
            )
        try:
            im = ImageOps.exif_transpose(im).convert("L" if channels == 1 else "RGB")
            if size is not None:
                im = resize_crop(im, size)
            arr = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:
            raise DataError(f"{path}: cannot decode image ({one_line(e)})") from None
    if arr.ndim == 2:
        return arr[None].copy()
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
