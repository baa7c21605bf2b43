"""Density heat maps: the model's ``p₀`` from the ODE likelihood beside the true density.

The model's density at each cell centre of a ``G × G`` grid is ``exp log p₀(x)`` with
``log p₀`` from the instantaneous change of variables through the blocks (paper eqs. 4 and 6,
:func:`psm.core.likelihood.log_likelihood`): all ``G²`` points are integrated together, in batches,
with a progress bar. Beside it goes the data's exact density (when the dataset has one) or a 2D
histogram of data samples, on the same colour scale.

Grids are stored row-major in y: ``log_p[i, j]`` is the value at ``(xs[j], ys[i])``, which is
what ``imshow(..., origin="lower")`` expects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.likelihood import log_likelihood
from ..core.model import BlockModel
from ..core.ode import PLOT_SOLVER, SolverSettings
from ..data import Dataset
from ..errors import PSMError
from ..progress import make_bar
from . import use_agg
from .layout import MAX_COLUMNS, panel_grid
from .samples import Extent, data_extent, save_figure, style_axes


@dataclass(frozen=True)
class DensityGrid:
    """Log-density values at the cell centres of a regular 2D grid.

    Attributes:
        xs: ``[G]`` cell-centre x coordinates, increasing.
        ys: ``[G]`` cell-centre y coordinates, increasing.
        log_p: ``[G, G]`` float64, ``log_p[i, j] = log p(xs[j], ys[i])`` (``-inf`` where
            ``p = 0``).
        extent: the window the cells tile.
    """

    xs: Tensor
    ys: Tensor
    log_p: Tensor
    extent: Extent

    @property
    def cell_area(self) -> float:
        """Area of one cell."""
        x0, x1, y0, y1 = self.extent
        return (x1 - x0) / len(self.xs) * (y1 - y0) / len(self.ys)

    def density(self) -> Tensor:
        """``p = exp(log p)``, ``[G, G]``."""
        return self.log_p.exp()

    def mass(self) -> float:
        """The midpoint-rule integral of ``p`` over the window (≈ 1 if the window holds the
        whole distribution)."""
        return float(self.density().nansum()) * self.cell_area


def grid_points(extent: Extent, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cell centres of a ``size × size`` grid tiling ``extent``.

    Args:
        extent: ``(x_min, x_max, y_min, y_max)``.
        size: cells per axis, G.

    Returns:
        ``(xs [G], ys [G], points [G * G, 2])`` in float64; ``points[i * G + j] = (xs[j], ys[i])``.
    """
    if size < 1:
        raise PSMError(f"grid size must be >= 1, got {size}")
    x0, x1, y0, y1 = extent
    xs = x0 + (torch.arange(size, dtype=torch.float64) + 0.5) * (x1 - x0) / size
    ys = y0 + (torch.arange(size, dtype=torch.float64) + 0.5) * (y1 - y0) / size
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return xs, ys, torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


def model_density(
    model: BlockModel,
    extent: Extent,
    *,
    size: int = 100,
    solver: SolverSettings = PLOT_SOLVER,
    batch_size: int = 2500,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    prior_log_prob: Callable[[Tensor], Tensor] | None = None,
    progress: bool = True,
) -> DensityGrid:
    """The model's ``log p₀`` on a grid, from the probability-flow ODE (eqs. 4 and 6).

    The cost is ``G²`` likelihood solves (each ``steps`` solver steps with an exact 2D trace);
    on two CPU cores a paper MLP takes roughly 10-25 s for ``G = 100`` and 100 RK4 steps.

    Args:
        model: the assembled blocks of a 2D model (its blocks on ``device`` in ``dtype``).
        extent: the window.
        size: cells per axis, G.
        solver: ODE solver and steps (default RK4, 100 steps over ``[t0, 1]``).
        batch_size: grid points per solve.
        dtype: evaluation dtype.
        device: where to evaluate.
        prior_log_prob: log-density at t = 1, ``[B, 2] -> [B]`` (default ``log N(0, I)``).
        progress: show a bar over the grid points (:func:`psm.progress.make_bar`).

    Returns:
        A :class:`DensityGrid`.
    """
    if batch_size < 1:
        raise PSMError(f"batch size must be >= 1, got {batch_size}")
    xs, ys, pts = grid_points(extent, size)
    parts = []
    with make_bar(len(pts), desc="density", unit="pt", disable=not progress, leave=False) as bar:
        for i in range(0, len(pts), batch_size):
            xb = pts[i : i + batch_size].to(device=device, dtype=dtype)
            lp = log_likelihood(model, xb, solver=solver, prior_log_prob=prior_log_prob)
            parts.append(lp.to("cpu", torch.float64))
            bar.update(len(xb))
    return DensityGrid(xs, ys, torch.cat(parts).reshape(size, size), extent)


def true_density(dataset: Dataset, extent: Extent, *, size: int = 100) -> DensityGrid | None:
    """The dataset's exact ``log p`` on the grid, or None when it has no closed form.

    Args:
        dataset: the data (its points as the model sees them, e.g. centred).
        extent: the window.
        size: cells per axis, G.
    """
    if not dataset.has_density:
        return None
    xs, ys, pts = grid_points(extent, size)
    lp = dataset.log_prob(pts.to(torch.float32)).to("cpu", torch.float64)
    return DensityGrid(xs, ys, lp.reshape(size, size), extent)


def histogram_density(points: Tensor, extent: Extent, *, size: int = 100) -> DensityGrid:
    """A normalised 2D histogram of ``points [N, 2]`` on the grid's cells, as a log-density.

    Counts are divided by ``N`` times the cell area, so the values estimate ``p`` (points
    outside the window count in ``N``: the mass inside is the share of points inside).
    """
    x = points.detach().to("cpu", torch.float64)
    x = x[torch.isfinite(x).all(1)]
    x0, x1, y0, y1 = extent
    ij = torch.stack(
        [((x[:, 1] - y0) / (y1 - y0) * size).floor(), ((x[:, 0] - x0) / (x1 - x0) * size).floor()],
        dim=1,
    ).long()
    inside = ((ij >= 0) & (ij < size)).all(1)
    counts = torch.zeros(size * size, dtype=torch.float64)
    flat = ij[inside, 0] * size + ij[inside, 1]
    counts.index_add_(0, flat, torch.ones(len(flat), dtype=torch.float64))
    xs, ys, _ = grid_points(extent, size)
    cell_area = (x1 - x0) / size * (y1 - y0) / size
    p = counts.reshape(size, size) / (max(len(x), 1) * cell_area)
    return DensityGrid(xs, ys, p.log(), extent)


def plot_density_comparison(
    models: BlockModel | Mapping[str, BlockModel],
    dataset: Dataset,
    path: str | Path,
    *,
    extent: Extent | None = None,
    size: int = 100,
    solver: SolverSettings = PLOT_SOLVER,
    batch_size: int = 2500,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    data_points: Tensor | None = None,
    title: str | None = None,
    progress: bool = True,
) -> Path:
    """Heat maps of each model's density beside the true density, on one colour scale.

    The reference panel is the dataset's exact density when it has one, else a 2D histogram of
    data points. Each model panel's title gives its mass inside the window (≈ 1 when the model
    puts its mass where the data are).

    Args:
        models: a 2D model, or a mapping ``label -> model`` (e.g. ``{"SA": sa, "TPSM": tpsm}``).
        dataset: the data the models were trained on.
        path: the PNG to write.
        extent: the window (default: :func:`~psm.viz.samples.data_extent` of the data points).
        size: cells per axis, G (G² likelihood solves per model).
        solver: ODE solver of the likelihood (default RK4, 100 steps).
        batch_size: grid points per solve.
        dtype: evaluation dtype.
        device: where to evaluate.
        data_points: data samples ``[N, 2]`` for the window and the histogram (default: 20000
            test points of ``dataset``).
        title: figure title (default: the grid and solver settings).
        progress: show progress bars.

    Returns:
        The path written.

    Raises:
        PSMError: the data are not 2D.
    """
    if tuple(dataset.shape) != (2,):
        raise PSMError(
            f"density heat maps need 2D points; {dataset.name} points have shape {dataset.shape}"
        )
    named = dict(models) if isinstance(models, Mapping) else {"model": models}
    if data_points is None:
        data_points = dataset.test_set(20000)
    if extent is None:
        extent = data_extent(data_points)
    ref = true_density(dataset, extent, size=size)
    ref_label = "true density"
    if ref is None:
        ref = histogram_density(data_points, extent, size=size)
        ref_label = f"data histogram ({len(data_points)} points)"
    kw = dict(
        size=size, solver=solver, batch_size=batch_size, dtype=dtype, device=device,
        progress=progress,
    )  # fmt: skip
    grids = {label: model_density(m, extent, **kw) for label, m in named.items()}
    how = solver.describe()
    title = title or f"density: ODE likelihood, {how}, {size}×{size} grid"
    _draw(grids, ref, ref_label, path, title)
    return Path(path)


def density_figure(
    grids: Mapping[str, DensityGrid], ref: DensityGrid, ref_label: str, title: str
) -> Any:
    """The heat-map figure: each model's grid, then the reference, in a grid of at most
    :data:`~psm.viz.layout.MAX_COLUMNS` panels per row, all on one colour scale (``p`` from 0 to
    the reference's 99.5th percentile) with one colour bar beside them.

    Args:
        grids: ``label -> model grid`` (titles give each one's mass in view).
        ref: the reference grid (true density or data histogram).
        ref_label: the reference panel's title.
        title: the figure title.

    Returns:
        The matplotlib figure (not yet saved).
    """
    plt = use_agg()
    from matplotlib.colors import Normalize

    ref_p = ref.density()
    finite = ref_p[torch.isfinite(ref_p)]
    vmax = float(torch.quantile(finite, 0.995)) if finite.numel() else 1.0
    if not math.isfinite(vmax) or vmax <= 0:
        vmax = 1.0
    norm = Normalize(0.0, vmax)
    panels = [(f"{label} (mass in view {g.mass():.3f})", g) for label, g in grids.items()]
    panels.append((ref_label, ref))
    fig, axes = panel_grid(plt, len(panels), extra_width=0.9)
    image = None
    for ax, (label, g) in zip(axes, panels):
        p = torch.nan_to_num(g.density(), nan=0.0, posinf=vmax).numpy()
        image = ax.imshow(
            p, origin="lower", extent=g.extent, norm=norm, cmap="viridis", interpolation="nearest"
        )
        style_axes(ax, g.extent)
        ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    bar = fig.colorbar(image, ax=axes, shrink=0.85 if len(axes) <= MAX_COLUMNS else 0.6)
    bar.set_label("p(x)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


def _draw(
    grids: Mapping[str, DensityGrid], ref: DensityGrid, ref_label: str, path: str | Path, title: str
) -> None:
    """Write :func:`density_figure` to ``path``."""
    save_figure(density_figure(grids, ref, ref_label, title), path)
