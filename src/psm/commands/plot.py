"""``psm plot RUN``: the figures of a trained 2D run, written into one folder.

* ``density.png``: the model's density (ODE likelihood on a grid, paper eqs. 4 and 6) beside
  the true density, or a histogram of data samples when the data have no closed form;
* ``samples.png``: model samples (probability-flow ODE, eq. 3) beside data samples;
* ``evolution.gif``: samples moving from noise to data, with the block edges on a time bar;
* ``loss_curves.png``: training loss per block.

The defaults (100 × 100 grid, RK4 with 100 steps) keep a paper-sized TY run under a minute on
two CPU cores; raise ``--grid`` and ``--steps`` for publication figures.
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
    warn,
)

PLOT_STEPS = 100
"""Default ODE steps of ``psm plot`` (the NLL's eval.steps would be 10x slower)."""


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="density heat map, sample scatter and evolution GIF of a 2D run",
        description="Write the figures of a trained 2D run into a folder (default <run>/plots): "
        "density.png, samples.png, evolution.gif and loss_curves.png.",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <run>/plots)")
    p.add_argument(
        "--grid",
        type=int,
        default=100,
        help="heat-map cells per axis; costs grid² likelihood solves (default 100)",
    )
    add_ode_arguments(p, steps_default=str(PLOT_STEPS))
    p.add_argument("--n", type=int, default=5000, help="samples in the scatter (default 5000)")
    p.add_argument("--gif-points", type=int, default=1000, help="points in the GIF (default 1000)")
    p.add_argument("--frames", type=int, default=60, help="GIF frames (default 60)")
    p.add_argument("--no-gif", action="store_true", help="skip the animation")
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

    from ..run import Run
    from ..sample import sample
    from ..trained import load_model
    from ..viz.animation import animate_samples
    from ..viz.density import plot_density_comparison
    from ..viz.losses import plot_loss_curves
    from ..viz.samples import data_extent, plot_samples

    run = Run.open(args.run)
    if run.shape != (2,):
        raise PSMError(
            f"psm plot draws 2D points; {run.config.data.name} points have shape {run.shape}"
        )
    dataset = run.dataset
    check_positive(n=args.n, gif_points=args.gif_points, batch_size=args.batch_size)
    if args.grid < 2:
        raise PSMError(f"--grid must be >= 2, got {args.grid}")
    if args.frames < 2:
        raise PSMError(f"--frames must be >= 2, got {args.frames}")
    ode = ode_settings(args, solver="rk4", steps=PLOT_STEPS, blocks=run.num_blocks)
    device = resolve_device(args.device)
    dtype = dtype_of(args.dtype)
    model = load_model(run, device=device, dtype=dtype, grid_field=grid_field_for(args, run))
    out_dir = Path(args.out) if args.out else run.path / "plots"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PSMError(f"cannot create {out_dir}: {e.strerror}") from None
    progress = not args.no_progress
    name = run.config.name
    how = ode.describe()
    data = dataset.test_set(20000, run.config.eval.test_seed)
    extent = data_extent(data)

    def done(path: Path, start: float) -> None:
        print(path, flush=True)
        print(f"  ({time.perf_counter() - start:.1f}s)", file=sys.stderr)

    start = time.perf_counter()
    try:
        done(plot_loss_curves(run, out_dir / "loss_curves.png"), start)
    except PSMError as e:
        warn(f"no loss plot: {e}")

    start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = sample(
        model, args.n, generator=gen, method="ode", solver=ode, batch_size=args.batch_size,
        dtype=dtype, device=device, progress=progress,
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
