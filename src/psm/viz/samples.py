"""2D sample scatters, the plotting window they share, and atomic figure files.

Every 2D plot of a run (density heat maps, scatters, the evolution animation) is drawn over one
:data:`Extent` computed from the data by :func:`data_extent`, so panels line up. Figures are
written with :func:`save_figure`: rendered in memory, then written atomically
(:mod:`psm.runs.atomic`), so a reader never sees half a PNG.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import PSMError
from ..runs.atomic import atomic_write_bytes
from . import use_agg
from .layout import panel_grid

Extent = tuple[float, float, float, float]
"""A plotting window ``(x_min, x_max, y_min, y_max)``."""

DATA_COLOR = "#444444"
MODEL_COLOR = "#1f77b4"


def data_extent(*points: Tensor, quantile: float = 0.001, pad: float = 0.15) -> Extent:
    """A square window around point sets, robust to a few far outliers.

    Per axis the window spans the ``[quantile, 1 - quantile]`` range of all points together,
    widened by ``pad`` times its size on each side; the shorter axis is then widened to the
    longer one about its centre (square cells, equal aspect).

    Args:
        *points: ``[N_i, 2]`` point sets (any dtype or device); non-finite rows are ignored.
        quantile: share of points allowed outside on each side of each axis.
        pad: margin, as a fraction of the span, added on each side.

    Returns:
        ``(x_min, x_max, y_min, y_max)``.
    """
    xs = [p.detach().to("cpu", torch.float64).reshape(-1, 2) for p in points]
    x = torch.cat(xs) if xs else torch.empty(0, 2, dtype=torch.float64)
    x = x[torch.isfinite(x).all(1)]
    if x.shape[0] == 0:
        raise PSMError("no finite points to frame a plot")
    q = torch.tensor([quantile, 1.0 - quantile], dtype=torch.float64)
    lo, hi = torch.quantile(x, q, dim=0)
    centre = 0.5 * (lo + hi)
    half = float((hi - lo).max()) * (0.5 + pad)
    half = max(half, 1e-3)
    cx, cy = float(centre[0]), float(centre[1])
    return (cx - half, cx + half, cy - half, cy + half)


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120, close: bool = True) -> Path:
    """Render a matplotlib figure and write it atomically.

    Args:
        fig: the figure.
        path: the file; its suffix picks the format (``.png``, ``.pdf``, ``.svg``).
        dpi: resolution.
        close: close the figure afterwards (frees its memory).

    Returns:
        The path written.
    """
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi)
    if close:
        use_agg().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def scatter(ax: Any, points: Tensor, extent: Extent, *, color: str, size: float = 1.5) -> Any:
    """Scatter ``points [N, 2]`` on ``ax`` over ``extent`` (equal aspect, no axis clutter).

    Returns:
        The matplotlib ``PathCollection`` (its offsets can be updated, e.g. in an animation).
    """
    p = points.detach().to("cpu", torch.float64).numpy()
    alpha = min(0.8, max(0.25, 1500.0 / max(len(p), 1)))
    art = ax.scatter(p[:, 0], p[:, 1], s=size, c=color, alpha=alpha, linewidths=0, rasterized=True)
    style_axes(ax, extent)
    return art


def outside(points: Tensor, extent: Extent) -> int:
    """How many of ``points [N, 2]`` lie outside ``extent`` (non-finite ones count)."""
    p = points.detach().to("cpu", torch.float64)
    x0, x1, y0, y1 = extent
    inside = (p[:, 0] >= x0) & (p[:, 0] <= x1) & (p[:, 1] >= y0) & (p[:, 1] <= y1)
    return int((~inside).sum())


def style_axes(ax: Any, extent: Extent) -> None:
    """Fix ``ax`` to ``extent`` with equal aspect and small tick labels."""
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.tick_params(labelsize=7)


def plot_samples(
    samples: Tensor | Mapping[str, Tensor],
    path: str | Path,
    *,
    data: Tensor | None = None,
    extent: Extent | None = None,
    title: str | None = None,
    max_points: int = 20000,
) -> Path:
    """Side-by-side scatters: data samples, then each model's samples, on one window (at most
    :data:`~psm.viz.layout.MAX_COLUMNS` panels per row).

    Args:
        samples: model samples ``[N, 2]``, or a mapping ``label -> [N, 2]`` for several models
            (e.g. ``{"SA": x_sa, "TPSM": x_tpsm}``).
        path: the PNG to write.
        data: data samples ``[M, 2]`` for the first panel (None: no data panel).
        extent: the window (default: :func:`data_extent` of ``data``, else of the samples).
        title: figure title.
        max_points: at most this many points drawn per panel (the first ones).

    Returns:
        The path written.

    Raises:
        PSMError: points that are not 2D.
    """
    sets = dict(samples) if isinstance(samples, Mapping) else {"model samples": samples}
    for label, x in [*sets.items(), *([("data", data)] if data is not None else [])]:
        if x.dim() != 2 or x.shape[1] != 2:
            raise PSMError(f"plot_samples draws 2D points; {label} has shape {tuple(x.shape)}")
    if extent is None:
        extent = data_extent(data) if data is not None else data_extent(*sets.values())
    panels: list[tuple[str, Tensor, str]] = []
    if data is not None:
        panels.append((f"data ({len(data)})", data, DATA_COLOR))
    for label, x in sets.items():
        out = outside(x, extent)
        note = f", {out} outside the view" if out else ""
        panels.append((f"{label} ({len(x)}{note})", x, MODEL_COLOR))
    plt = use_agg()
    fig, axes = panel_grid(plt, len(panels), panel_size=(3.6, 3.7), layout=None)
    for ax, (label, x, color) in zip(axes, panels):
        scatter(ax, x[:max_points], extent, color=color)
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
