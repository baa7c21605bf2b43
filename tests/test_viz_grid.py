"""Multi-panel figures people can read: at most four panels per row, one shared colour bar."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from psm.core.ode import SolverSettings
from psm.core.process import make_process
from psm.viz.density import DensityGrid, density_figure, grid_points, plot_density_comparison
from psm.viz.layout import MAX_COLUMNS, grid_shape
from psm.viz.samples import plot_samples
from test_likelihood import D64, GAUSS, exact_model
from test_viz import GaussData

EXTENT = (-2.0, 2.0, -2.0, 2.0)


def gaussian_grid(scale: float, size: int = 12) -> DensityGrid:
    """An isotropic Gaussian's log-density on a grid (its peak grows as ``scale`` shrinks)."""
    xs, ys, pts = grid_points(EXTENT, size)
    d = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=D64), scale**2 * torch.eye(2))
    return DensityGrid(xs, ys, d.log_prob(pts).reshape(size, size), EXTENT)


def panel_and_bar_axes(fig):
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    panels = [ax for ax in fig.axes if ax.images and ax not in bars]
    return panels, bars


@pytest.mark.parametrize(
    ("n", "shape"), [(1, (1, 1)), (2, (1, 2)), (4, (1, 4)), (5, (2, 3)), (6, (2, 3)),
                     (8, (2, 4)), (9, (3, 3)), (13, (4, 4))],
)  # fmt: skip
def test_grid_shape_wraps_at_four_columns_and_balances_rows(n, shape):
    rows, cols = grid_shape(n)
    assert (rows, cols) == shape
    assert cols <= MAX_COLUMNS and rows * cols >= n and (rows - 1) * cols < n


def test_six_panels_are_two_rows_on_one_colour_scale_with_one_bar():
    grids = {f"model {i}": gaussian_grid(0.4 + 0.1 * i) for i in range(5)}
    fig = density_figure(grids, gaussian_grid(0.5), "true density", "six panels")
    panels, bars = panel_and_bar_axes(fig)
    assert len(panels) == 6 and len(bars) == 1
    rows = {ax.get_subplotspec().rowspan.start for ax in panels}
    cols = {ax.get_subplotspec().colspan.start for ax in panels}
    assert len(rows) == 2 and len(cols) <= MAX_COLUMNS
    # one colour scale: every panel's image maps values to colours the same way, and the bar
    # shows that scale (the sharpest model peaks above it and is clipped, not rescaled)
    clims = {ax.images[0].get_clim() for ax in panels}
    assert len(clims) == 1
    assert bars[0].images or bars[0].collections  # the bar is drawn
    (vmin, vmax) = clims.pop()
    assert vmin == 0.0 and vmax < float(grids["model 0"].density().max())
    width, height = fig.get_size_inches()
    assert 1.0 < width / height < 2.0  # the old single row of 6 was 22.4 x 3.9 inches
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_a_six_panel_density_png_is_no_longer_one_long_row(tmp_path):
    process = make_process("vp")
    models = {f"K={i}": exact_model(GAUSS, process) for i in range(5)}
    out = plot_density_comparison(
        models, GaussData(True), tmp_path / "d.png", size=8, solver=SolverSettings("rk4", 4),
        dtype=D64, progress=False,
    )  # fmt: skip
    with Image.open(out) as im:
        width, height = im.size
    # one row of 8 panels used to be 3552 x 468 (7.6:1); 6 panels now make 2 rows of 3
    assert 1.0 < width / height < 2.0 and width < 1600


def test_sample_scatters_wrap_too(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sets = {f"m{i}": GAUSS.sample(50, gen) for i in range(5)}
    out = plot_samples(sets, tmp_path / "s.png", data=GAUSS.sample(50, gen))
    with Image.open(out) as im:
        width, height = im.size
    assert 1.0 < width / height < 2.0  # 6 panels: 2 rows of 3
