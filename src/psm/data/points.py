"""The user's own points: a ``.npy`` array ``[N, d]`` or a ``.csv`` of comma-separated numbers.

Files are read without executing anything (``np.load(allow_pickle=False)``; csv parsed by
hand), and every problem is a :class:`DataError` whose one-line message names the file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from .base import DataError, Dataset, DataSpec

SUFFIXES = (".npy", ".csv")


def load_points(path: str | Path) -> np.ndarray:
    """Read a points file into a finite float64 array ``[N, d]`` (``d >= 1``).

    Args:
        path: a ``.npy`` file holding a numeric 2D array, or a ``.csv`` file of
            comma-separated numbers with an optional one-line header.

    Raises:
        DataError: missing or unreadable file, unknown extension, unparsable csv line,
            pickled/object/non-numeric array, wrong rank, no columns or rows, non-finite values.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"points file {p}: unknown extension {p.suffix!r} (use .npy or .csv)")
    if not p.is_file():
        raise DataError(f"points file {p}: no such file")
    x = _read_npy(p) if suffix == ".npy" else _read_csv(p)
    if x.ndim != 2:
        raise DataError(f"points file {p}: expected an array [N, d], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"points file {p}: no points (shape {tuple(x.shape)})")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise DataError(
            f"points file {p}: {int(bad.sum())} row(s) with NaN or infinite values "
            f"(first: row {int(np.argmax(bad))})"
        )
    return x


def load_npy(p: Path, what: str, *, mmap: bool = False) -> np.ndarray:
    """One ``.npy`` array, never unpickled; every failure a one-line :class:`DataError` that
    starts with ``what`` (``"points file x.npy"``)."""
    try:
        with p.open("rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(f"{what}: cannot open ({_line(e)})") from None
    if magic.startswith(b"PK"):
        raise DataError(f"{what}: holds an .npz archive, not a single .npy array")
    if magic != b"\x93NUMPY":
        raise DataError(f"{what}: not a .npy file (no NumPy header)")
    try:
        return np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "object" in str(e).lower():  # loading would unpickle
            raise DataError(
                f"{what}: holds an object (pickled) array, which psm never loads; "
                "save a numeric array"
            ) from None
        raise DataError(f"{what}: not a readable .npy file ({_line(e)})") from None
    except (OSError, EOFError) as e:
        raise DataError(f"{what}: not a readable .npy file ({_line(e)})") from None


def _read_npy(p: Path) -> np.ndarray:
    """A numeric ``.npy`` array as float64 (any rank), never unpickling."""
    arr = load_npy(p, f"points file {p}")
    if arr.dtype.names is not None or arr.dtype.kind not in "biuf":
        raise DataError(f"points file {p}: array dtype {arr.dtype} is not numeric")
    return arr.astype(np.float64)


def _line(e: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(e).split())


def _parse_row(line: str) -> list[float] | None:
    """The numbers of one csv line, or None when some field is not a number."""
    try:
        return [float(f) for f in line.split(",")]
    except ValueError:
        return None


def _is_header(line: str) -> bool:
    """A header line has no field that reads as a number (e.g. ``x,y``)."""
    return all(_parse_row(f) is None for f in line.split(","))


def _read_csv(p: Path) -> np.ndarray:
    """Comma-separated numbers (optional one-line header, blank lines skipped) → ``[N, d]``."""
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"points file {p}: cannot read as utf-8 text ({_line(e)})") from None
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if lines and _is_header(lines[0][1]):
        lines = lines[1:]
    rows: list[list[float]] = []
    for lineno, line in lines:
        row = _parse_row(line)
        if row is None:
            raise DataError(
                f"points file {p}: line {lineno} is not comma-separated numbers: {line[:60]!r}"
            )
        if not all(map(math.isfinite, row)):
            raise DataError(f"points file {p}: line {lineno} has a NaN or infinite value")
        if rows and len(row) != len(rows[0]):
            raise DataError(
                f"points file {p}: line {lineno} has {len(row)} values, expected {len(rows[0])}"
            )
        rows.append(row)
    if not rows:
        raise DataError(f"points file {p}: no data rows")
    return np.asarray(rows, dtype=np.float64)


def split_sizes(n: int, test_fraction: float, path: Path) -> tuple[int, int]:
    """``(n_train, n_test)`` for ``n`` points: ``n_test = max(1, round(n · test_fraction))``.

    Raises:
        DataError: a fraction outside (0, 1), or fewer than 2 train or 1 test points.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"points file {path}: test_fraction must be in (0, 1), got {test_fraction}")
    n_test = max(1, round(n * test_fraction))
    if n - n_test < 2:
        raise DataError(
            f"points file {path}: {n} point(s) is too few to hold out {n_test} for testing "
            "and keep at least 2 for training"
        )
    return n - n_test, n_test


class PointsDataset(Dataset):
    """Points from a file, split once into train and test parts.

    The split is a permutation drawn from ``seed`` (the same file and seed always give the
    same split). Training batches are drawn from the train part with replacement.

    Args:
        path: ``.npy`` array ``[N, d]`` or ``.csv`` file (see :func:`load_points`).
        test_fraction: share held out for testing (at least one point).
        center: subtract the train mean from both parts.
        seed: seed of the train/test split.

    Attributes:
        shift: the subtracted train mean ``[d]`` (float64; zeros when not centring).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        test_fraction: float = 0.1,
        center: bool = True,
        seed: int = 0,
    ) -> None:
        self.path = Path(path)
        self.name = "points"
        x = load_points(self.path)
        n_train, _ = split_sizes(len(x), test_fraction, self.path)
        perm = np.random.default_rng(seed).permutation(len(x))
        train, test = x[perm[:n_train]], x[perm[n_train:]]
        self.shape = (int(x.shape[1]),)
        shift = train.mean(axis=0) if center else np.zeros(self.shape[0])
        self.shift = torch.from_numpy(shift)
        self._train = torch.from_numpy(train - shift).to(torch.float32)
        self._test = torch.from_numpy(test - shift).to(torch.float32)
        self._cache: dict[torch.device, Tensor] = {}

    @property
    def n_train(self) -> int:
        """Number of training points."""
        return len(self._train)

    @property
    def train_points(self) -> Tensor:
        """All training points ``[n_train, d]`` (centred when ``center``), on the CPU."""
        return self._train.clone()

    @property
    def n_test(self) -> int:
        """Number of held-out points."""
        return len(self._test)

    def _train_on(self, device: torch.device) -> Tensor:
        """The train points ``[n_train, d]`` on ``device``, cached."""
        if device not in self._cache:
            self._cache[device] = self._train.to(device)
        return self._cache[device]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` train points drawn with replacement, ``[n, d]`` on ``generator.device``."""
        train = self._train_on(generator.device)
        idx = torch.randint(0, len(train), (n,), generator=generator, device=generator.device)
        return train[idx]

    def test_set(self, n: int, seed: int = 12345, dequantize: bool | None = None) -> Tensor:
        """The held-out points ``[min(n, n_test), d]``; a ``seed``-chosen subset if fewer.

        Args:
            n: how many points at most.
            seed: picks which ones when ``n < n_test``.
            dequantize: must be None (points have no levels; see :meth:`Dataset.test_set`).
        """
        self._no_levels(dequantize)
        if n >= self.n_test:
            return self._test.clone()
        g = torch.Generator().manual_seed(seed)
        return self._test[torch.randperm(self.n_test, generator=g)[: max(n, 0)]].clone()


class PointsData(DataSpec):
    """``data: {name: points, path: P.npy}``: the user's own points (``.npy`` or ``.csv``)."""

    name: Literal["points"] = "points"
    path: str  # .npy array [N, d] or .csv of comma-separated numbers
    center: bool = True  # subtract the train mean
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # held-out share, split by train.seed

    def build(self, *, seed: int) -> Dataset:
        return PointsDataset(
            self.path, test_fraction=self.test_fraction, center=self.center, seed=seed
        )

    def files(self) -> list[Path]:
        return [Path(self.path)]


__all__ = ["PointsData", "PointsDataset", "load_points", "split_sizes"]
