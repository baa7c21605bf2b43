r"""Image datasets: a prepared directory (see :mod:`psm.data.prepare`) or the bundled digits.

The data map. A raw level :math:`k \in \{0, \dots, L-1\}` becomes

.. math::

    x = (k + u) / L,\quad u \sim U[0, 1)   \qquad\text{(uniform dequantization)}

    y = s\,(x - m)

with scale :math:`s` (``scale``) and shift :math:`m`: the per-pixel training mean
:math:`m = (\bar k + 1/2) / L` when ``center`` (the authors centre by the training mean), else
:math:`m = 1/2`. The model is trained on, and scores, :math:`y`. The map :math:`x \to y` has
log-Jacobian :math:`\log s` per dimension (:attr:`ImageDataset.log_scale_per_dim`), so for
:math:`D = C H W` dimensions

.. math::

    \mathrm{bpd} = \frac{\mathrm{NLL}_\text{nats}(y) - D \log s}{D \ln 2} + \log_2 L

(:meth:`ImageDataset.bits_per_dim`); :math:`\log_2 L` turns the density of :math:`x` on
:math:`[0, 1)^D` into the discrete probability of :math:`k` (bins of width :math:`1/L`).

The authors' own convention (``dequantize=False``) uses no noise:
:math:`y = s\,(k / (L-1) - m')` with :math:`m' = \bar k / (L-1)` (or 1/2), and reports
``log2(L) - log p(y) / (D ln 2)`` with :math:`s = 1`: the same formula. Report the dequantized
figure as the headline and say which convention each number uses.

Training batches (:meth:`ImageDataset.sample`) are drawn by index with the caller's generator
(fresh batches, no epochs), with random horizontal flips and fresh dequantization noise from
the same generator, so a block's stream is a pure function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from .base import DataError, Dataset, DataSpec
from .prepare import DATA_FILES, MEAN_FILE, META_FILE, TEST_FILE, TRAIN_FILE, read_meta
from .sources import DIGITS_LEVELS, digits_file, digits_split

MAX_DEVICE_BYTES = 1 << 30  # train arrays below this live on the generator's device
# u is scaled by this so that k + u < k + 1 in float32 for k < 256 (else k + u can round up to
# k + 1); the cells lose 2^-16 of their width, about 2e-5 bits/dim.
DEQUANT_SPAN = 1.0 - 2.0**-16


@dataclass(frozen=True)
class ImageArrays:
    """The raw arrays of an image set.

    Attributes:
        name: the dataset name.
        levels: L, the number of intensity levels.
        train: uint8 ``[n_train, C, H, W]`` (a read-only memmap for a prepared directory).
        test: uint8 ``[n_test, C, H, W]``.
        train_mean: float64 ``[C, H, W]``, the mean of the train levels.
        split: how train and test were split.
        files: the files the arrays come from.
    """

    name: str
    levels: int
    train: np.ndarray
    test: np.ndarray
    train_mean: np.ndarray
    split: dict[str, Any] = field(default_factory=dict)
    files: tuple[Path, ...] = ()


def _load_array(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path.parent} has no {path.name} (not a complete prepared directory)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        msg = " ".join(str(e).split())
        raise DataError(f"{path}: unreadable or truncated {what} ({msg})") from None


def load_prepared(root: str | Path) -> ImageArrays:
    """Memory-map a prepared directory and check it against its ``meta.json``.

    Raises:
        DataError: one line for a missing file, a foreign format tag, a truncated array, or
            arrays whose shape, dtype or length disagree with the meta.
    """
    root = Path(root)
    meta = read_meta(root)
    shape = tuple(meta["shape"])
    train = _load_array(root / TRAIN_FILE, "train array")
    test = _load_array(root / TEST_FILE, "test array")
    mean = _load_array(root / MEAN_FILE, "train mean")
    for arr, file, n in ((train, TRAIN_FILE, meta["n_train"]), (test, TEST_FILE, meta["n_test"])):
        if arr.dtype != np.uint8 or arr.shape != (n, *shape):
            raise DataError(
                f"{root / file}: {arr.dtype} {list(arr.shape)} does not match {META_FILE} "
                f"(uint8 {[n, *shape]})"
            )
    if mean.dtype != np.float64 or mean.shape != shape:
        raise DataError(
            f"{root / MEAN_FILE}: {mean.dtype} {list(mean.shape)} is not float64 {list(shape)}"
        )
    return ImageArrays(
        name=meta["name"],
        levels=meta["levels"],
        train=train,
        test=test,
        train_mean=np.array(mean),
        split=meta["split"],
        files=tuple(root / f for f in DATA_FILES),
    )


def digits_arrays() -> ImageArrays:
    """scikit-learn's bundled 8x8 digits (17 levels) with the fixed split of
    :func:`psm.data.sources.digits_split`."""
    train, test, split = digits_split()
    return ImageArrays(
        name="digits",
        levels=DIGITS_LEVELS,
        train=train,
        test=test,
        train_mean=train.mean(axis=0, dtype=np.float64),
        split=split,
        files=(digits_file(),),
    )


class ImageDataset(Dataset):
    """Images as a :class:`Dataset`: dequantized, centred, scaled, flipped (module docstring).

    Args:
        arrays: the raw arrays (:func:`load_prepared`, :func:`digits_arrays`).
        center: shift by the per-pixel training mean (else by 1/2).
        scale: the factor ``s`` of ``y = s (x - m)``.
        flip: random horizontal flips of training batches (never of the test set).
        dequantize: add uniform noise, ``x = (k + u) / L`` (else ``x = k / (L - 1)``).
        max_device_bytes: train arrays up to this size are kept on the generator's device
            (one gather per batch); larger ones are gathered from the memmap on the CPU.

    Attributes:
        name, shape (``(C, H, W)``), levels (L), n_train, n_test, split.
        log_scale_per_dim: ``log(scale)``, the log-Jacobian per dimension of ``x -> y``.
    """

    entropy = None

    def __init__(
        self,
        arrays: ImageArrays,
        *,
        center: bool = True,
        scale: float = 1.0,
        flip: bool = True,
        dequantize: bool = True,
        max_device_bytes: int = MAX_DEVICE_BYTES,
    ) -> None:
        if not (math.isfinite(scale) and scale > 0):
            raise DataError(f"image scale must be a positive number, got {scale}")
        self.arrays = arrays
        self.name = arrays.name
        self.shape: tuple[int, ...] = tuple(int(s) for s in arrays.train.shape[1:])
        self.levels = int(arrays.levels)
        self.n_train = len(arrays.train)
        self.n_test = len(arrays.test)
        self.split = arrays.split
        self.center = center
        self.scale = float(scale)
        self.flip = flip
        self.dequantize = dequantize
        self.log_scale_per_dim = math.log(self.scale)
        self.resident = arrays.train.nbytes <= max_device_bytes
        mean = torch.from_numpy(np.asarray(arrays.train_mean, dtype=np.float64))
        half = torch.full_like(mean, 0.5)
        # shift m of y = s (x - m), per convention (dequantized or not), float64 [C, H, W]
        self._shift = {
            True: (mean + 0.5) / self.levels if center else half,
            False: mean / (self.levels - 1) if center else half,
        }
        self._train_cache: dict[torch.device, Tensor] = {}
        self._shift_cache: dict[tuple[bool, torch.device, torch.dtype], Tensor] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def open(cls, root: str | Path, **options: Any) -> ImageDataset:
        """The dataset of a prepared directory; ``options`` as in the constructor."""
        return cls(load_prepared(root), **options)

    @classmethod
    def digits(cls, **options: Any) -> ImageDataset:
        """The bundled 8x8 digits, in memory; ``options`` as in the constructor."""
        return cls(digits_arrays(), **options)

    # ------------------------------------------------------------------ the map
    def shift(self, dequantize: bool | None = None) -> Tensor:
        """The shift ``m`` of ``y = s (x - m)``, float64 ``[C, H, W]`` on the CPU."""
        return self._shift[self.dequantize if dequantize is None else dequantize].clone()

    def _shift_on(self, dequantize: bool, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (dequantize, device, dtype)
        if key not in self._shift_cache:
            self._shift_cache[key] = self._shift[dequantize].to(device=device, dtype=dtype)
        return self._shift_cache[key]

    def levels_to_unit(self, k: Tensor, generator: torch.Generator | None) -> Tensor:
        """Raw levels to ``x`` in ``[0, 1]``, float32, same shape and device as ``k``.

        Args:
            k: integer levels ``[n, C, H, W]`` in 0..L-1.
            generator: draws ``u ~ U[0, 1)`` for ``x = (k + u) / L``, every ``x`` inside its
                cell ``[k/L, (k+1)/L)``; ``None`` gives the authors' ``x = k / (L - 1)``.
        """
        x = k.to(torch.float32)
        if generator is None:
            return x.div_(self.levels - 1)
        u = torch.rand(k.shape, generator=generator, device=k.device)
        return x.add_(u, alpha=DEQUANT_SPAN).div_(self.levels)

    @property
    def half_bin_width(self) -> float:
        """``h = s / (2L)``: half a level's bin ``[k/L, (k+1)/L)`` in the model's space."""
        return self.scale / (2 * self.levels)

    def bin_centres(self, k: Tensor) -> Tensor:
        """The centres of the levels' bins in the model's space, ``y = s ((k + 1/2)/L - m)``
        with the dequantized convention's ``m``: float64, same shape and device as ``k``
        (where :mod:`psm.data.dequantize`'s truncated-normal noise is added)."""
        x = (k.to(torch.float64) + 0.5) / self.levels
        return self.unit_to_model(x, True)

    def test_levels(self, n: int) -> Tensor:
        """The raw levels of the first ``min(n, n_test)`` test images (those :meth:`test_set`
        maps), uint8 ``[n, C, H, W]`` on the CPU."""
        m = max(0, min(n, self.n_test))
        return torch.from_numpy(np.array(self.arrays.test[:m]))

    def unit_to_model(self, x: Tensor, dequantize: bool | None = None) -> Tensor:
        """``y = s (x - m)`` (in place on ``x``); ``x`` is ``[n, C, H, W]``."""
        deq = self.dequantize if dequantize is None else dequantize
        y = x.sub_(self._shift_on(deq, x.device, x.dtype))
        return y if self.scale == 1.0 else y.mul_(self.scale)

    def to_unit(self, y: Tensor, dequantize: bool | None = None) -> Tensor:
        """Invert the map: ``x = y / s + m``, clipped to ``[0, 1]`` (e.g. for sample grids).

        Args:
            y: model-space images ``[n, C, H, W]``.
            dequantize: which convention ``y`` uses (default: the dataset's).

        Returns:
            ``[n, C, H, W]`` in ``[0, 1]``, same device and dtype as ``y``.
        """
        deq = self.dequantize if dequantize is None else dequantize
        x = y / self.scale + self._shift_on(deq, y.device, y.dtype)
        return x.clamp_(0.0, 1.0)

    def bits_per_dim(self, nll_nats: Tensor | float) -> Tensor | float:
        """Bits/dim from the NLL in nats of model-space ``y`` (per image):
        ``(nll - D log s) / (D ln 2) + log2 L``."""
        d = math.prod(self.shape)
        return (nll_nats - d * self.log_scale_per_dim) / (d * math.log(2)) + math.log2(self.levels)

    # ------------------------------------------------------------------ drawing
    def _train_on(self, device: torch.device) -> Tensor:
        if device not in self._train_cache:
            self._train_cache[device] = torch.from_numpy(np.array(self.arrays.train)).to(device)
        return self._train_cache[device]

    def gather(self, idx: Tensor) -> Tensor:
        """Train images by index: uint8 ``[n, C, H, W]`` on ``idx.device``."""
        if self.resident:
            return self._train_on(idx.device)[idx]
        rows = self.arrays.train[idx.cpu().numpy()]
        return torch.from_numpy(rows).to(idx.device)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """A fresh training batch ``[n, C, H, W]`` float32 on ``generator.device``.

        Indices (uniform with replacement), flips and dequantization noise are all drawn from
        ``generator``, in that order.
        """
        dev = generator.device
        idx = torch.randint(0, self.n_train, (n,), generator=generator, device=dev)
        k = self.gather(idx)
        if self.flip:
            flipped = torch.rand(n, generator=generator, device=dev) < 0.5
            k = torch.where(flipped.view(n, 1, 1, 1), k.flip(-1), k)
        x = self.levels_to_unit(k, generator if self.dequantize else None)
        return self.unit_to_model(x)

    def test_set(self, n: int, seed: int = 12345, dequantize: bool | None = None) -> Tensor:
        """The first ``min(n, n_test)`` test images, float32 ``[n, C, H, W]`` on the CPU.

        Args:
            n: how many at most.
            seed: seeds the dequantization noise (one draw for the whole set).
            dequantize: ``False`` gives the authors' convention (no noise, ``k / (L - 1)``);
                default: the dataset's.
        """
        deq = self.dequantize if dequantize is None else dequantize
        m = max(0, min(n, self.n_test))
        k = torch.from_numpy(np.array(self.arrays.test[:m]))
        g = torch.Generator().manual_seed(seed) if deq else None
        return self.unit_to_model(self.levels_to_unit(k, g), deq)

    def files(self) -> list[Path]:
        """The data files this dataset reads (for a content digest)."""
        return list(self.arrays.files)


def image_dataset(name: str, path: str | Path | None = None, **options: Any) -> ImageDataset:
    """An image dataset by config name: ``digits`` (bundled) or a prepared directory.

    Args:
        name: ``digits``, ``mnist``, ``cifar10``, ``celeba64``, ``imagenet64`` or ``folder``.
        path: the directory made by ``psm data prepare`` (optional for ``digits``); its
            ``meta.json`` must name the same source.
        options: constructor keywords of :class:`ImageDataset`.

    Raises:
        DataError: no path for a source that needs one, or a directory of another source.
    """
    if path is None:
        if name == "digits":
            return ImageDataset.digits(**options)
        raise DataError(
            f"data.path is required for {name} (a directory made by "
            f"'psm data prepare {name} --from SOURCE --out DIR')"
        )
    arrays = load_prepared(path)
    if arrays.name != name:
        raise DataError(f"{path} holds {arrays.name!r} images, not {name!r}")
    return ImageDataset(arrays, **options)


IMAGE_SOURCES = ("digits", "mnist", "cifar10", "celeba64", "imagenet64", "folder")
NO_FLIP = ("digits", "mnist")  # digits are not mirror-symmetric


class ImageData(DataSpec):
    """``data: {name: digits}`` (bundled, offline) or ``{name: mnist | cifar10 | celeba64 |
    imagenet64 | folder, path: DIR}`` with DIR made by ``psm data prepare``.

    The model sees ``y = scale (x - m)``, ``x = (k + u) / L`` dequantized, ``m`` the per-pixel
    training mean (module docstring); bits/dim adds back ``log scale`` per dimension.
    """

    name: Literal["digits", "mnist", "cifar10", "celeba64", "imagenet64", "folder"] = "digits"
    path: str | None = None  # the prepared directory (none for the bundled digits)
    center: bool = True  # subtract the per-pixel training mean (the authors do)
    scale: float = Field(2.0, gt=0.0)  # y = scale * (x - mean): 2 spans about [-1, 1]
    flip: bool | None = None  # random horizontal flips; default: yes, but not for digits/mnist
    dequantize: bool = True  # x = (k + u) / L; False: the authors' k / (L - 1)

    def build(self, *, seed: int) -> Dataset:
        flip = self.flip if self.flip is not None else self.name not in NO_FLIP
        return image_dataset(
            self.name, self.path, center=self.center, scale=self.scale, flip=flip,
            dequantize=self.dequantize,
        )  # fmt: skip

    def files(self) -> list[Path]:
        if self.path is None:
            return []
        root = Path(self.path)
        return [root / f for f in DATA_FILES if (root / f).exists()]


__all__ = [
    "IMAGE_SOURCES", "ImageArrays", "ImageData", "ImageDataset", "digits_arrays",
    "image_dataset", "load_prepared",
]  # fmt: skip
