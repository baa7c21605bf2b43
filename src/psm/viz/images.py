"""Image figures: sample grids and strips of samples at the block boundaries.

* :func:`save_image_grid`: a PNG of images tiled in a grid, pixel for pixel (Pillow), small
  images enlarged with nearest-neighbour so that an 8x8 digit is visible;
* :func:`save_boundary_strip`: one row per sample and one column per block boundary, from noise
  (t = 1) on the left to data (t0) on the right, each column labelled with its time
  (matplotlib).

Images come in ``[0, 1]`` (the caller maps model space back with
:meth:`~psm.data.images.ImageDataset.to_unit`), ``[n, C, H, W]`` with C = 1 (grey) or 3 (RGB).
Files are written atomically.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import PSMError
from ..runs.atomic import atomic_write_bytes
from . import use_agg
from .samples import save_figure

MIN_CELL = 48
"""Images smaller than this many pixels on a side are enlarged (nearest-neighbour) to at least
it in a grid."""


def _check(images: Tensor, what: str) -> np.ndarray:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise PSMError(
            f"{what}: expected images [n, C, H, W] with C = 1 or 3, got {tuple(images.shape)}"
        )
    x = images.detach().to("cpu", torch.float32).nan_to_num(0.5).clamp(0.0, 1.0)
    return (x.numpy() * 255.0 + 0.5).astype(np.uint8)


def tile(images: Tensor, *, nrow: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile images into one array.

    Args:
        images: ``[n, C, H, W]`` in ``[0, 1]`` (values outside are clipped, NaN drawn grey).
        nrow: images per row (default: about the square root of n).
        pad: pixels of white between images and around the border.
        scale: integer enlargement of every image.

    Returns:
        ``uint8`` ``[H', W']`` (grey) or ``[H', W', 3]`` (RGB).
    """
    a = _check(images, "image grid")
    n, c, h, w = a.shape
    if n == 0:
        raise PSMError("image grid: no images")
    if scale > 1:
        a = a.repeat(scale, axis=2).repeat(scale, axis=3)
        h, w = h * scale, w * scale
    cols = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    out = np.full((c, pad + rows * (h + pad), pad + cols * (w + pad)), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        out[:, y : y + h, x : x + w] = a[i]
    return out[0] if c == 1 else out.transpose(1, 2, 0)


def cell_scale(size: int, minimum: int = MIN_CELL) -> int:
    """The integer enlargement that brings an image side of ``size`` pixels to ``minimum``."""
    return max(1, math.ceil(minimum / max(size, 1)))


def save_image_grid(
    images: Tensor, path: str | Path, *, nrow: int | None = None, pad: int = 2
) -> Path:
    """Write images as one PNG grid (pixel for pixel; images under 48 pixels enlarged).

    Args:
        images: ``[n, C, H, W]`` in ``[0, 1]``, C = 1 or 3.
        path: the PNG to write.
        nrow: images per row (default: about the square root of n).
        pad: white pixels between images (times the enlargement).

    Returns:
        The path written.
    """
    from PIL import Image

    scale = cell_scale(min(images.shape[-2:]))
    arr = tile(images, nrow=nrow, pad=pad * scale if pad else 0, scale=scale)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB").save(buf, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def format_time(t: float, t0: float | None = None) -> str:
    """A column label: ``t = 0.1``, or ``t0 = 0.001`` for the floor."""
    if t0 is not None and t == t0:
        return f"t0 = {t:.3g}"
    return f"t = {t:.3g}"


def save_boundary_strip(
    states: Tensor,
    times: Sequence[float],
    path: str | Path,
    *,
    t0: float | None = None,
    title: str | None = None,
) -> Path:
    """Samples at each block boundary, noise to data: one row per sample, one column per time.

    Args:
        states: ``[T, n, C, H, W]`` in ``[0, 1]``, the n samples at each of the T times.
        times: the T times, from 1 (noise) down to t0 (data).
        path: the PNG to write.
        t0: the floor (its column is labelled ``t0``).
        title: figure title.

    Returns:
        The path written.
    """
    if states.dim() != 5 or states.shape[0] != len(times):
        raise PSMError(
            f"boundary strip: expected [T={len(times)}, n, C, H, W], got {tuple(states.shape)}"
        )
    cols, rows = states.shape[0], states.shape[1]
    h, w = states.shape[-2:]
    # one image per (row, column): tile row-major with `cols` images per row
    ordered = states.transpose(0, 1).reshape(cols * rows, *states.shape[2:])
    scale = cell_scale(min(h, w))
    pad = 2
    arr = tile(ordered, nrow=cols, pad=pad, scale=scale)
    plt = use_agg()
    cell_w, cell_h = w * scale + pad, h * scale + pad
    fig_w = max(4.0, arr.shape[1] / 80 + 0.4)
    lines = len(textwrap.wrap(title, width=max(40, int(fig_w * 13)))) if title else 0
    fig_h = arr.shape[0] / 80 + 0.8 + 0.2 * lines
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, vmin=0, vmax=255, interpolation="none")
    ax.set_xticks([pad + cell_w * k + cell_w / 2 - pad / 2 for k in range(cols)])
    ax.set_xticklabels([format_time(t, t0) for t in times], fontsize=7, rotation=30)
    ax.xaxis.tick_top()
    ax.set_yticks([pad + cell_h * r + cell_h / 2 - pad / 2 for r in range(rows)])
    ax.set_yticklabels([str(r) for r in range(rows)], fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.suptitle(textwrap.fill(title, width=max(40, int(fig_w * 13))), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
