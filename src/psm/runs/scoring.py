"""Scoring what a user brings: read points or images, map them exactly as in training, and
return ``log p(x)`` per input; the paired statistics that compare runs on the same points.

Inputs (:func:`read_input`), for the run's kind of data:

* point runs: a ``.npy`` array or ``.csv`` file ``[N, D]`` (:func:`psm.data.points.load_points`)
  in the coordinates of the run's data: the units of its file for a ``points`` run (psm
  subtracts the run's training mean, as training did), psm's own coordinates for the built-in
  2D sets (those ``psm sample`` writes). Points outside the data's support are scored.
* image runs: raw levels ``k`` in ``0..L-1`` as a uint8 ``.npy`` (``[N, H, W]`` for one
  channel, ``[N, H, W, C]`` or ``[N, C, H, W]``), a directory made by ``psm data prepare``
  (its test split, or ``split="train"``), an image folder or a single PNG/JPEG (decoded with
  Pillow to the run's channels, resized and centre-cropped only when the run's data were
  prepared that way). Images are mapped as the ``psm`` convention of ``psm nll`` maps the test
  set: ``x = (k + u) / L`` with one draw of ``u`` from ``seed`` for the whole input, then
  ``y = s (x - m)`` (:class:`~psm.data.images.ImageDataset`); so the run's own test images
  with the run's ``eval.test_seed`` give exactly ``psm nll``'s values.

``log p`` is the model's log-density of the model-space point (the quantity whose mean
``psm nll`` reports, negated); for images bits/dim is
:meth:`~psm.data.images.ImageDataset.bits_per_dim` of it (the psm convention: an upper bound
on the discrete NLL of the levels, dequantization noise fixed by ``seed``). With
``dequantization="truncated-normal"`` the levels are dequantized as ``psm nll
--dequantization truncated-normal`` does (:mod:`psm.data.dequantize`: the bin centre plus
``σ_t0/α_t0`` noise cut to the bin, the run's ``t0``) and bits/dim is
``(-log p + log q) / (D ln 2)``.

The model comes from :func:`open_for_scoring`, the one place that turns a source into what
scoring needs: a run directory or a model written by ``psm export``
(:func:`~psm.runs.inference.open_source`), whose data map (training mean, levels, scale) the
export carries, so scoring needs neither the run directory nor the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..core.likelihood import NLLResult, evaluate_nll
from ..core.model import BlockModel, GridField
from ..data.base import DataError, Dataset
from ..data.dequantize import TRUNCATED_NORMAL, UNIFORM, dequantization_name
from ..data.formats import IMAGE_SUFFIXES, list_images, load_image
from ..data.images import ImageData, ImageDataset, load_prepared
from ..data.points import load_points
from ..data.prepare import META_FILE, read_meta
from ..errors import PSMError
from ..progress import progress_bar
from .inference import (
    BitsPerDim,
    EvalSettings,
    ModelSource,
    bits_per_dim,
    is_image_data,
    open_source,
    truncated_normal_for,
    with_t0,
)
from .run import Run

Split = Literal["test", "train"]
SPLITS: tuple[str, ...] = ("test", "train")
POINT_SUFFIXES = (".npy", ".csv")


# --------------------------------------------------------------------------- the model
def open_for_scoring(source: str | Path | Run | ModelSource) -> ModelSource:
    """Open what ``psm score`` and ``psm compare`` score, weights not yet loaded: a run
    directory (its data files checked: the map from the user's inputs needs the run's
    dataset) or an exported ``.safetensors`` file (its stored data map; no data needed).

    Raises:
        RunError: no such run or file; ExportError: not a psm export; DataError: a run's data
            changed or vanished.
    """
    src = open_source(source)
    src.check_data()
    return src


def load_scoring_model(
    source: ModelSource,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    grid_field: GridField = "constant",
) -> BlockModel:
    """The blocks of a source opened by :func:`open_for_scoring` (unfinished runs are
    refused, naming the blocks)."""
    return source.load(device=device, dtype=dtype, grid_field=grid_field)


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ScoringInput:
    """Inputs mapped into the model's space.

    Attributes:
        x: model-space points ``[N, *shape]`` float32 on the CPU.
        raw: the raw uint8 levels ``[N, C, H, W]`` of image inputs (None for points).
        log_q: truncated-normal dequantization: the noise's log-density per image ``[N]``
            (float64, nats, model space); None otherwise.
    """

    x: Tensor
    raw: np.ndarray | None = None
    log_q: Tensor | None = None

    @property
    def n(self) -> int:
        """Number of inputs."""
        return int(self.x.shape[0])


def read_input(
    source: ModelSource,
    path: str | Path,
    *,
    seed: int,
    split: Split = "test",
    dequantization: str = UNIFORM,
) -> ScoringInput:
    """Read a user's input file or folder and map it as the run's training did
    (:meth:`~psm.runs.inference.ModelSource.to_model`).

    Args:
        source: from :func:`open_for_scoring` (its data map maps the inputs).
        path: see the module docstring for what each kind of run reads.
        seed: image runs: seeds the dequantization noise (one draw for the whole input).
        split: image runs given a prepared directory: which of its splits.
        dequantization: image runs: ``"uniform"`` or ``"truncated-normal"`` (noise at the
            run's ``t0``); ignored for points (whose evaluation settings refuse it).

    Raises:
        DataError: one line for a missing or unreadable input, a wrong shape, dtype or range,
            NaN or infinite values, no inputs, or images of mixed sizes.
    """
    p = Path(path)
    dataset = source.dataset
    if not (p.exists() or p.is_symlink()):
        raise DataError(f"input {p}: no such file or folder")
    if p.is_file() and p.stat().st_size == 0:
        raise DataError(f"input {p}: empty file")
    if is_image_data(dataset):
        if not isinstance(dataset, ImageDataset):
            raise DataError(
                f"psm score reads images for psm's image datasets; {dataset.name!r} is not one"
            )
        raw = read_images(p, shape=source.shape, levels=dataset.levels, resize=_resize(source),
                          split=split)  # fmt: skip
        g = torch.Generator().manual_seed(seed)  # one draw for the whole input, as psm nll's
        if dequantization_name(dequantization) == TRUNCATED_NORMAL:
            x, log_q = source.dequantize_truncated_normal(torch.from_numpy(raw), generator=g)
            return ScoringInput(x, raw, log_q)
        x, _ = source.to_model(torch.from_numpy(raw), generator=g)
        return ScoringInput(x, raw)
    if p.is_dir():
        raise DataError(f"input {p}: a folder; a point run scores a .npy or .csv file [N, d]")
    points = read_points(p, source.shape)
    x, _ = source.to_model(torch.from_numpy(points))
    return ScoringInput(x)


def read_points(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A points file ``[N, D]`` for a run whose points have ``shape == (D,)``, float64.

    Raises:
        DataError: see :func:`psm.data.points.load_points`; also a column count other than D.
    """
    if path.suffix.lower() not in POINT_SUFFIXES:
        raise DataError(f"input {path}: a point run scores a .npy or .csv file [N, d]")
    x = load_points(path)
    if (x.shape[1],) != tuple(shape):
        raise DataError(
            f"input {path}: points of {x.shape[1]} dimension(s), this run's have "
            f"{math.prod(shape)} (expected [N, {math.prod(shape)}])"
        )
    return x


def _resize(source: ModelSource) -> int | None:
    """The side length the run's image files were resized to when prepared (None: not, or
    an exported model whose prepared directory is not here: its inputs must have the run's
    size)."""
    data = source.config.data
    if not isinstance(data, ImageData) or data.path is None:
        return None
    try:
        meta = read_meta(data.path)
    except DataError:
        if source.is_export:
            return None
        raise
    options = meta.get("provenance", {}).get("options", {})
    size = options.get("size") if isinstance(options, dict) else None
    return int(size) if isinstance(size, int) else None


def read_images(
    path: Path,
    *,
    shape: tuple[int, ...],
    levels: int,
    resize: int | None = None,
    split: Split = "test",
) -> np.ndarray:
    """Raw image levels uint8 ``[N, C, H, W]`` from a ``.npy``, a prepared directory, an image
    folder or one image file, checked against the run's ``shape`` ``(C, H, W)`` and levels.

    Args:
        path: the input.
        shape: the run's ``(C, H, W)``.
        levels: L; every value must be in ``0..L-1``.
        resize: image files: resize and centre-crop to this side (as the run's data were
            prepared); None: images must already be ``H x W``, all of one size.
        split: a prepared directory's split.

    Raises:
        DataError: one line (module docstring).
    """
    if path.is_dir():
        if (path / META_FILE).exists():
            raw = _prepared(path, shape, levels, split)
        else:
            raw = _folder(path, list_images(path), shape, resize)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        raw = _folder(path, [path], shape, resize)
    elif path.suffix.lower() == ".npy":
        raw = _image_array(path, shape)
    else:
        raise DataError(
            f"input {path}: an image run scores a uint8 .npy, a prepared directory, an image "
            "folder or a PNG/JPEG file"
        )
    check_levels(raw, levels, path)
    return raw


def check_levels(raw: np.ndarray, levels: int, path: Path) -> None:
    """Refuse values above ``levels - 1`` (uint8 cannot be negative)."""
    top = int(raw.max()) if raw.size else 0
    if top > levels - 1:
        first = int(np.argmax((raw > levels - 1).reshape(len(raw), -1).any(axis=1)))
        raise DataError(
            f"input {path}: image {first} has level {top}, outside 0..{levels - 1} (this run's "
            f"data have {levels} levels)"
        )


def _load_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array, memory-mapped, never unpickled."""
    from ..data.points import load_npy

    return load_npy(path, f"input {path}", mmap=True)


def _image_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 ``.npy`` of images in any of the layouts the module accepts → ``[N, C, H, W]``."""
    arr = _load_npy(path)
    c, h, w = shape
    want = f"[N, {c}, {h}, {w}] or [N, {h}, {w}, {c}]" + (f" or [N, {h}, {w}]" if c == 1 else "")
    if arr.dtype != np.uint8:
        hint = " (psm scores raw levels; convert whole levels with .astype(np.uint8))"
        raise DataError(
            f"input {path}: {arr.dtype} images; expected uint8 levels {want}"
            + (hint if arr.dtype.kind in "iuf" else "")
        )
    if arr.ndim == 3 and c == 1 and arr.shape[1:] == (h, w):
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1:] == (c, h, w):
        pass
    elif arr.ndim == 4 and arr.shape[1:] == (h, w, c):
        arr = arr.transpose(0, 3, 1, 2)
    else:
        raise DataError(
            f"input {path}: images of shape {list(arr.shape)} do not fit this run's "
            f"{c}x{h}x{w} images (give {want})"
        )
    if arr.shape[0] == 0:
        raise DataError(f"input {path}: no images (shape {list(arr.shape)})")
    return np.array(arr)  # read from the memmap, contiguous [N, C, H, W]


def _prepared(path: Path, shape: tuple[int, ...], levels: int, split: Split) -> np.ndarray:
    """One split of a prepared directory, checked against the run's shape and levels."""
    if split not in SPLITS:
        raise DataError(f"split {split!r}: choose from {', '.join(SPLITS)}")
    arrays = load_prepared(path)
    arr = arrays.test if split == "test" else arrays.train
    if tuple(arr.shape[1:]) != tuple(shape) or arrays.levels != levels:
        raise DataError(
            f"input {path}: {arrays.name} images {'x'.join(map(str, arr.shape[1:]))} with "
            f"{arrays.levels} levels; this run's are {'x'.join(map(str, shape))} with {levels}"
        )
    return np.array(arr)


def _folder(
    path: Path, files: list[Path], shape: tuple[int, ...], resize: int | None
) -> np.ndarray:
    """Decode image files to the run's channels (resized as the run's data were, if they
    were); all must come out the run's ``(C, H, W)``."""
    if not files:
        raise DataError(f"input {path}: no .png/.jpg/.jpeg files (searched recursively)")
    c, h, w = shape
    images: list[np.ndarray] = []
    for f in files:
        img = load_image(f, channels=c, size=resize)
        if images and img.shape != images[0].shape:
            raise DataError(
                f"input {path}: images of mixed sizes: {f} is {img.shape[2]}x{img.shape[1]}, "
                f"{files[0]} is {images[0].shape[2]}x{images[0].shape[1]}"
            )
        images.append(img)
    if images[0].shape != (c, h, w):
        got = images[0].shape
        raise DataError(
            f"input {path}: images are {got[2]}x{got[1]}, this run's are {w}x{h} (width x height)"
        )
    return np.stack(images)


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())


# --------------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class Scores:
    """Per-input scores.

    Attributes:
        result: the NLL result (``values`` ``[N]``: ``-log p`` in nats, float64).
        bits: bits/dim per image and its mean (image data only; the psm convention, its
            dequantization in ``bits.dequantization``).
    """

    result: NLLResult
    bits: BitsPerDim | None

    @property
    def log_prob(self) -> Tensor:
        """``log p`` per input ``[N]``, nats, float64."""
        return -self.result.values


def score_inputs(
    model: BlockModel,
    x: Tensor,
    dataset: Dataset,
    settings: EvalSettings,
    *,
    probe_seed: int = 0,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    log_q: Tensor | None = None,
) -> Scores:
    """``log p`` of model-space inputs ``x [N, *shape]`` under ``settings`` (from
    :func:`~psm.runs.inference.eval_settings`, the psm convention): the computation of
    :func:`~psm.runs.inference.evaluate_model` on the caller's points.

    Args:
        log_q: with ``settings.dequantization == "truncated-normal"``: the noise's
            log-density per input ``[N]`` (:attr:`ScoringInput.log_q`), for bits/dim.

    Raises:
        PSMError: no inputs; truncated-normal settings without ``log_q`` (or one of another
            length).
    """
    if x.shape[0] < 1:
        raise PSMError("no inputs to score")
    tn = settings.dequantization == TRUNCATED_NORMAL and is_image_data(dataset)
    if tn and (log_q is None or log_q.shape != (x.shape[0],)):
        raise PSMError("truncated-normal bits/dim need log q of each input's noise")
    model = with_t0(model, settings.t0)
    with progress_bar("score", enabled=progress) as bar:
        result = evaluate_nll(
            model, x, batch_size=batch_size, solver=settings.solver, trace=settings.trace,
            probes=settings.probes, redraw=settings.redraw, seed=probe_seed, device=device,
            dtype=dtype, progress=bar,
        )  # fmt: skip
    if tn:
        q = truncated_normal_for(model.process, settings.t0, dataset)  # type: ignore[arg-type]
        bits = bits_per_dim(result, dataset, "psm", log_q=log_q, noise_scale=q.scale)
    else:
        bits = bits_per_dim(result, dataset, "psm") if is_image_data(dataset) else None
    return Scores(result, bits)


# --------------------------------------------------------------------------- paired statistics
@dataclass(frozen=True)
class PairedRow:
    """One run of a paired comparison against the first.

    Attributes:
        mean: the run's mean value (NLL or bits/dim).
        stderr: its standard error, ``std(v) / sqrt(n)`` (ddof 1).
        diff: ``mean - mean of the first run`` (0 for the first).
        diff_stderr: the paired standard error, ``std(v - v_first) / sqrt(n)`` (ddof 1).
        unpaired_stderr: ``sqrt(stderr² + stderr_first²)``, what the difference's error would
            be for independent test sets (shown for contrast).
    """

    mean: float
    stderr: float
    diff: float
    diff_stderr: float
    unpaired_stderr: float

    @property
    def z(self) -> float:
        """``diff / diff_stderr`` (NaN for the first run or a zero error)."""
        if self.diff_stderr > 0:
            return self.diff / self.diff_stderr
        return math.nan


def paired_stats(values: list[np.ndarray] | np.ndarray) -> list[PairedRow]:
    """Means, standard errors and paired differences against the first of R value vectors
    on the same n points.

    Args:
        values: R arrays ``[n]`` (or one array ``[R, n]``), entry i of each the same point.

    Returns:
        R rows; row 0 has ``diff == 0`` and NaN difference errors.

    Raises:
        ValueError: fewer than one vector, vectors of different lengths, or fewer than two
            points.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] < 1:
        raise ValueError(f"expected R >= 1 vectors of equal length, got shape {v.shape}")
    n = v.shape[1]
    if n < 2:
        raise ValueError(f"a standard error needs at least 2 points, got {n}")
    root = math.sqrt(n)
    se = v.std(axis=1, ddof=1) / root
    means = v.mean(axis=1)
    rows = []
    for r in range(v.shape[0]):
        d = v[r] - v[0]
        first = r == 0
        rows.append(
            PairedRow(
                mean=float(means[r]),
                stderr=float(se[r]),
                diff=float(d.mean()),
                diff_stderr=math.nan if first else float(d.std(ddof=1) / root),
                unpaired_stderr=math.nan if first else float(math.hypot(se[r], se[0])),
            )
        )
    return rows


__all__ = [
    "SPLITS", "PairedRow", "Scores", "ScoringInput", "load_scoring_model", "open_for_scoring",
    "paired_stats", "read_images", "read_input", "read_points", "score_inputs",
]  # fmt: skip
