"""The figures of ``psm demo``: both methods beside the truth, on the same scales."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.ode import SolverSettings
from ..core.sample import sample
from ..progress import progress_bar
from ..runs.inference import load_model
from ..runs.run import Run
from .animation import animate_samples
from .density import plot_density_comparison
from .losses import plot_loss_curves
from .samples import data_extent, plot_samples


def demo_figures(
    runs: list[Run],
    labels: list[str],
    folder: Path,
    *,
    n_samples: int = 5000,
    grid: int = 100,
    steps: int = 100,
    gif: bool = True,
    progress: bool = True,
) -> list[Path]:
    """Write the demo's figures into ``folder``.

    * ``density.png``: the true density beside each method's ODE density (RK4, ``steps``
      steps) on a ``grid`` x ``grid`` window, one colour scale;
    * ``samples.png``: data beside ``n_samples`` ODE samples of each method;
    * ``loss_<run>.png``: per-block loss curves of each run;
    * ``evolution.gif``: the last run's samples moving from noise to data through its blocks.

    Args:
        runs: trained runs on the same dataset.
        labels: a label per run.
        folder: where to write.
        n_samples: samples per method for the scatter.
        grid: heat-map resolution.
        steps: RK4 steps over [t0, 1] for densities and samples.
        gif: write the animation.
        progress: progress bars.

    Returns:
        The paths written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    dataset = runs[0].dataset
    solver = SolverSettings("rk4", steps)
    data = dataset.sample(n_samples, torch.Generator().manual_seed(1))
    extent = data_extent(data)
    models = {label: load_model(run) for label, run in zip(labels, runs)}
    written = [plot_loss_curves(r, folder / f"loss_{r.config.name}.png") for r in runs]
    written.append(
        plot_density_comparison(
            models,
            dataset,
            folder / "density.png",
            extent=extent,
            size=grid,
            solver=solver,
            progress=progress,
        )
    )
    with progress_bar("sample (ode)", enabled=progress) as bar:
        samples = {
            label: sample(
                m,
                n_samples,
                generator=torch.Generator().manual_seed(2),
                solver=solver,
                progress=bar,
            )
            for label, m in models.items()
        }
    written.append(plot_samples(samples, folder / "samples.png", data=data, extent=extent))
    if gif:
        label, model = list(models.items())[-1]
        written.append(
            animate_samples(
                model,
                folder / "evolution.gif",
                n=1000,
                solver=solver,
                data=data[:2000],
                extent=extent,
                title=f"{label}: noise to data",
                progress=progress,
            )
        )
    return written
