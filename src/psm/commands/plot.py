"""``psm plot RUN``: the figures of a trained run, written into one folder.

2D runs:

* ``density.png``: the model's density (ODE likelihood on a grid, paper eqs. 4 and 6) beside
  the true density, or a histogram of data samples when the data have no closed form;
* ``samples.png``: model samples (probability-flow ODE, eq. 3) beside data samples;
* ``evolution.gif``: samples moving from noise to data, with the block edges on a time bar;
* ``loss_curves.png``: training loss per block.

The defaults (100 × 100 grid, RK4 with 100 steps) keep a paper-sized TY run under a minute on
two CPU cores; raise ``--grid`` and ``--steps`` for publication figures.

Image runs:

* ``samples.png``: a grid of ``--n`` samples (default 64; probability-flow ODE), mapped back to
  pixels;
* ``boundaries.png``: the first ``--rows`` of the same samples at each block boundary from noise
  (t = 1) to data (t0), one row per sample, one column per boundary; with more than
  ``--columns`` boundaries (DPSM, TPSM2) evenly spaced ones, the ends always included;
* ``loss_curves.png``: training loss per block.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import PSMError
from .model_flags import (
    add_model_arguments,
    add_ode_arguments,
    check_positive,
    dtype_of,
    grid_field_for,
    ode_settings,
    resolve_device,
    set_threads,
    warn,
)

PLOT_STEPS = 100
"""Default ODE steps of ``psm plot`` (the NLL's eval.steps would be 10x slower)."""
N_POINTS, N_IMAGES = 5000, 64  # default samples: 2D scatter, image grid
GRID, GIF_POINTS, FRAMES = 100, 1000, 60  # 2D defaults
ROWS, COLUMNS = 8, 11  # image boundary strip: samples, most boundaries


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="figures of a trained run: 2D density, scatter and GIF, or image sample grids",
        description="Write the figures of a trained run into a folder (default <run>/plots). "
        "2D runs: density.png, samples.png, evolution.gif and loss_curves.png. Image runs: "
        "samples.png (a sample grid), boundaries.png (the same samples at each block boundary, "
        "noise to data) and loss_curves.png.",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <run>/plots)")
    p.add_argument(
        "--grid",
        type=int,
        help="2D: heat-map cells per axis; costs grid² likelihood solves (default 100)",
    )
    add_ode_arguments(p, steps_default=str(PLOT_STEPS))
    p.add_argument(
        "--n",
        type=int,
        help=f"samples in the scatter (default {N_POINTS}) or the image grid (default {N_IMAGES})",
    )
    p.add_argument("--gif-points", type=int, help="2D: points in the GIF (default 1000)")
    p.add_argument("--frames", type=int, help="2D: GIF frames (default 60)")
    p.add_argument("--no-gif", action="store_true", help="2D: skip the animation")
    p.add_argument(
        "--rows", type=int, help=f"images: samples in the boundary strip (default {ROWS})"
    )
    p.add_argument(
        "--columns",
        type=int,
        help=f"images: most boundaries in the strip, evenly spaced (default {COLUMNS})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=2500,
        help="points per solve (likelihood and sampling; default 2500)",
    )
    add_model_arguments(p)
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    import torch

    from ..core.ode import SolverSettings
    from ..core.sample import sample
    from ..progress import progress_bar
    from ..runs.inference import load_model
    from ..runs.run import Run
    from ..viz.animation import animate_samples
    from ..viz.density import plot_density_comparison
    from ..viz.samples import data_extent, plot_samples

    run = Run.open(args.run)
    run.check_data()  # a changed or vanished data file, before anything is built from it
    set_threads(args)
    if len(run.shape) == 3:
        return plot_images(args, run)
    if run.shape != (2,):
        raise PSMError(
            f"psm plot draws 2D points or images; {run.config.data.name} points have shape "
            f"{run.shape}"
        )
    given = [f"--{k}" for k in ("rows", "columns") if getattr(args, k) is not None]
    if given:
        raise PSMError(f"{', '.join(given)} apply to image runs")
    args.n = args.n or N_POINTS
    args.grid = GRID if args.grid is None else args.grid
    args.gif_points = GIF_POINTS if args.gif_points is None else args.gif_points
    args.frames = FRAMES if args.frames is None else args.frames
    dataset = run.dataset
    check_positive(n=args.n, gif_points=args.gif_points, batch_size=args.batch_size)
    if args.grid < 2:
        raise PSMError(f"--grid must be >= 2, got {args.grid}")
    if args.frames < 2:
        raise PSMError(f"--frames must be >= 2, got {args.frames}")
    ode = ode_settings(args, SolverSettings("rk4", PLOT_STEPS), blocks=run.num_blocks)
    device = resolve_device(args.device)
    dtype = dtype_of(args.dtype)
    model = load_model(run, device=device, dtype=dtype, grid_field=grid_field_for(args, run))
    out_dir = _out_dir(args, run)
    progress = not args.no_progress
    name = run.config.name
    how = ode.describe()
    data = dataset.test_set(20000, run.config.eval.test_seed)
    extent = data_extent(data)

    _loss_curves(run, out_dir)

    start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with progress_bar("sample (ode)", enabled=progress) as bar:
        x = sample(
            model, args.n, generator=gen, method="ode", solver=ode, batch_size=args.batch_size,
            dtype=dtype, device=device, progress=bar,
        )  # fmt: skip
    path = plot_samples(
        {"model (ODE)": x}, out_dir / "samples.png", data=data[: args.n], extent=extent,
        title=f"{name}: samples, ODE {how}, seed {args.seed}",
    )  # fmt: skip
    done(path, start)

    start = time.perf_counter()
    path = plot_density_comparison(
        model, dataset, out_dir / "density.png", extent=extent, size=args.grid, solver=ode,
        batch_size=args.batch_size, dtype=dtype, device=device, data_points=data,
        title=f"{name}: density from the ODE likelihood ({how}, {args.grid}×{args.grid} grid)",
        progress=progress,
    )  # fmt: skip
    done(path, start)

    if not args.no_gif:
        start = time.perf_counter()
        path = animate_samples(
            model, out_dir / "evolution.gif", n=args.gif_points, seed=args.seed, solver=ode,
            frames=args.frames, data=data[:2000], title=f"{name}: noise → data, ODE {how}",
            dtype=dtype, device=device, progress=progress,
        )  # fmt: skip
        done(path, start)
    return 0


def plot_images(args: argparse.Namespace, run) -> int:
    """``psm plot`` on an image run: sample grid, boundary strip, loss curves."""
    import torch

    from ..core.ode import SolverSettings
    from ..core.sample import boundary_times, pick_times, sample_path
    from ..data.base import PixelMap
    from ..progress import progress_bar
    from ..runs.inference import load_model
    from ..viz.images import save_boundary_strip, save_image_grid

    given = [
        f"--{k.replace('_', '-')}"
        for k in ("grid", "gif_points", "frames")
        if getattr(args, k) is not None
    ] + (["--no-gif"] if args.no_gif else [])
    if given:
        raise PSMError(
            f"{', '.join(given)} apply to 2D runs; image runs take --n, --rows, --columns"
        )
    n = args.n or N_IMAGES
    rows = ROWS if args.rows is None else args.rows
    columns = COLUMNS if args.columns is None else args.columns
    check_positive(n=n, rows=rows, batch_size=args.batch_size)
    if columns < 2:
        raise PSMError(f"--columns must be >= 2 (noise and data), got {columns}")
    dataset = run.dataset
    if not isinstance(dataset, PixelMap):
        raise PSMError(
            f"psm plot: {run.config.data.name} points of shape {run.shape} have no map back to "
            "pixels"
        )
    ode = ode_settings(args, SolverSettings("rk4", PLOT_STEPS), blocks=run.num_blocks)
    device = resolve_device(args.device)
    dtype = dtype_of(args.dtype)
    model = load_model(run, device=device, dtype=dtype, grid_field=grid_field_for(args, run))
    out_dir = _out_dir(args, run)
    name = run.config.name

    _loss_curves(run, out_dir)

    start = time.perf_counter()
    times = pick_times(boundary_times(model), columns)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with progress_bar("sample (ode)", enabled=not args.no_progress) as bar:
        x, states = sample_path(
            model, n, generator=gen, at=times, method="ode", solver=ode,
            batch_size=args.batch_size, dtype=dtype, device=device, progress=bar,
        )  # fmt: skip
    done(save_image_grid(dataset.to_unit(x.float()), out_dir / "samples.png"), start)
    start = time.perf_counter()
    strip = states[:, :rows].float()
    strip = dataset.to_unit(strip.flatten(0, 1)).reshape(strip.shape)
    k = len(boundary_times(model)) - 1
    shown = f"{len(times)} of {k + 1}" if len(times) < k + 1 else f"all {k + 1}"
    title = (
        f"{name}: {strip.shape[1]} samples at {shown} block boundaries, noise to data "
        f"(ODE {ode.describe()}, seed {args.seed})"
    )
    path = save_boundary_strip(strip, times, out_dir / "boundaries.png", t0=model.t0, title=title)
    done(path, start)
    return 0


def _out_dir(args: argparse.Namespace, run) -> Path:
    """``--out`` or ``<run>/plots``, created; a folder that cannot be made is one line."""
    out_dir = Path(args.out) if args.out else run.path / "plots"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PSMError(f"cannot create {out_dir}: {e.strerror}") from None
    return out_dir


def done(path: Path, start: float) -> None:
    """Print a written figure's path (stdout) and the seconds it took (stderr)."""
    print(path, flush=True)
    print(f"  ({time.perf_counter() - start:.1f}s)", file=sys.stderr)


def _loss_curves(run, out_dir: Path) -> None:
    """``loss_curves.png`` of every run; a run without logged losses is a warning."""
    from ..viz.losses import plot_loss_curves

    start = time.perf_counter()
    try:
        done(plot_loss_curves(run, out_dir / "loss_curves.png"), start)
    except PSMError as e:
        warn(f"no loss plot: {e}")
