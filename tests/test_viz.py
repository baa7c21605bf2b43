"""Plots: the density heat map's math (an exact model's grid integrates to 1 and equals the true
density), grid layout, histograms, sample scatters and the evolution GIF."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from psm.core.ode import SolverSettings
from psm.core.partition import grid
from psm.core.process import make_process
from psm.core.sample import sample_ode
from psm.data import Dataset, make_dataset
from psm.errors import PSMError
from psm.viz.animation import animate_samples, record_trajectory
from psm.viz.density import (
    grid_points,
    histogram_density,
    model_density,
    plot_density_comparison,
    true_density,
)
from psm.viz.samples import data_extent, plot_samples
from test_likelihood import D64, GAUSS, T0, UNEVEN7, exact_model, exact_prior

# GAUSS is N((0.5, -1), [[1, 0.6], [0.6, 0.8]]): a window of ±6 around its mean holds all mass
WINDOW = (0.5 - 6.0, 0.5 + 6.0, -1.0 - 6.0, -1.0 + 6.0)


class GaussData(Dataset):
    """GAUSS as a psm dataset (float32 points), with or without its closed-form density."""

    name = "gauss"
    shape = (2,)

    def __init__(self, exact: bool = True) -> None:
        self.exact = exact

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return GAUSS.sample(n, generator).float()

    @property
    def has_density(self) -> bool:
        return self.exact

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        d = torch.distributions.MultivariateNormal(GAUSS.means[0], GAUSS.covs[0])
        return d.log_prob(x.to(D64))


def test_grid_points_are_row_major_in_y():
    xs, ys, pts = grid_points((0.0, 4.0, -1.0, 1.0), 4)
    torch.testing.assert_close(xs, torch.tensor([0.5, 1.5, 2.5, 3.5], dtype=D64))
    torch.testing.assert_close(ys, torch.tensor([-0.75, -0.25, 0.25, 0.75], dtype=D64))
    for i in range(4):
        for j in range(4):
            torch.testing.assert_close(pts[i * 4 + j], torch.stack([xs[j], ys[i]]))


@pytest.mark.parametrize("name", ["vp", "ot"])
def test_exact_model_heat_map_integrates_to_one_and_is_the_true_density(name):
    process = make_process(name)
    model = exact_model(GAUSS, process, UNEVEN7)
    g = model_density(
        model, WINDOW, size=40, solver=SolverSettings("rk4", 40), dtype=D64, progress=False
    )
    # the flow carries N(0, I) onto a density: whatever the prior mismatch, the mass is 1
    assert g.mass() == pytest.approx(1.0, abs=1e-4)
    exact = model_density(
        model,
        WINDOW,
        size=40,
        solver=SolverSettings("rk4", 40),
        dtype=D64,
        batch_size=700,
        progress=False,
        prior_log_prob=exact_prior(GAUSS, process),
    )
    assert exact.mass() == pytest.approx(1.0, abs=1e-4)
    _, _, pts = grid_points(WINDOW, 40)
    want = GAUSS.log_prob(process, pts, T0).reshape(40, 40)
    bulk = want > -12.0
    assert (exact.log_p - want)[bulk].abs().max().item() < 1e-3
    # orientation: the peak sits at the mean (0.5, -1), not at its transpose
    i, j = divmod(int(exact.log_p.argmax()), 40)
    assert abs(g.xs[j] - 0.5) < 0.3 and abs(g.ys[i] + 1.0) < 0.3


def test_true_density_and_histogram_are_normalised():
    ty = make_dataset("ty")
    window = data_extent(ty.test_set(5000))
    g = true_density(ty, window, size=120)
    assert g is not None and g.mass() == pytest.approx(1.0, abs=0.03)  # boxes: edge cells
    assert true_density(GaussData(exact=False), window) is None
    pts = GAUSS.sample(4000, torch.Generator().manual_seed(0))
    h = histogram_density(pts, (-1.0, 2.0, -2.0, 1.0), size=10)
    inside = ((pts[:, 0] >= -1) & (pts[:, 0] < 2) & (pts[:, 1] >= -2) & (pts[:, 1] < 1)).sum()
    assert h.mass() == pytest.approx(inside.item() / 4000, abs=1e-9)


def test_data_extent_is_square_and_ignores_a_far_outlier():
    pts = GAUSS.sample(2000, torch.Generator().manual_seed(1))
    far = torch.cat([pts, torch.tensor([[1e6, -1e6], [math.nan, 0.0]], dtype=D64)])
    x0, x1, y0, y1 = data_extent(far)
    assert x1 - x0 == pytest.approx(y1 - y0)
    assert x1 - x0 < 12 and x0 < 0.5 < x1 and y0 < -1.0 < y1


@pytest.mark.parametrize("exact", [True, False], ids=["true-density", "histogram"])
def test_plot_density_comparison_writes_a_png(tmp_path, exact):
    process = make_process("vp")
    models = {"K=1": exact_model(GAUSS, process), "K=7": exact_model(GAUSS, process, UNEVEN7)}
    out = plot_density_comparison(
        models,
        GaussData(exact),
        tmp_path / "d.png",
        size=10,
        solver=SolverSettings("rk4", 6),
        dtype=D64,
        progress=False,
    )
    assert out == tmp_path / "d.png"
    with Image.open(out) as im:
        im.verify()
        assert im.format == "PNG"


def test_plot_samples_writes_a_png_and_refuses_non_2d(tmp_path):
    gen = torch.Generator().manual_seed(2)
    data, a, b = (GAUSS.sample(300, gen) for _ in range(3))
    out = plot_samples({"a": a, "b": b}, tmp_path / "s.png", data=data, title="t")
    with Image.open(out) as im:
        im.verify()
    with pytest.raises(PSMError, match="2D"):
        plot_samples(torch.zeros(5, 3), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_trajectory_runs_from_noise_to_the_samplers_result():
    process = make_process("vp")
    model = exact_model(GAUSS, process, UNEVEN7, shape=(2,))
    x1 = torch.randn(20, 2, generator=torch.Generator().manual_seed(3), dtype=D64)
    traj = record_trajectory(model, x1, solver=SolverSettings("rk4", 30), frames=6)
    assert len(traj.times) == traj.states.shape[0] == 6 and traj.states.shape[1:] == (20, 2)
    assert traj.times[0] == 1.0 and traj.times[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(traj.times, traj.times[1:]))
    torch.testing.assert_close(traj.states[0], x1.float())
    torch.testing.assert_close(
        traj.states[-1], sample_ode(model, x1, solver=SolverSettings("rk4", 30)).float()
    )


def test_animation_is_a_multi_frame_gif_also_for_a_dpsm_grid(tmp_path):
    process = make_process("vp")
    model = exact_model(GAUSS, process, grid(50), shape=(2,))  # 50 faint edges on the time bar
    data = GAUSS.sample(200, torch.Generator().manual_seed(4))
    out = animate_samples(
        model,
        tmp_path / "a.gif",
        n=60,
        solver=SolverSettings("euler", 50),
        frames=8,
        data=data,
        dtype=D64,
        progress=False,
    )
    with Image.open(out) as im:
        assert im.format == "GIF" and im.n_frames == 8
