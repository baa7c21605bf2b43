"""An animated GIF of samples travelling from noise (t = 1) to data (t = t0) through the blocks.

The trajectory is recorded with the samplers' ``on_step`` hook (probability-flow ODE, eq. 3 per
block, or the reverse SDE, eq. 7), a subset of the steps kept as frames. Under the scatter a time
bar shows the current t, the partition's block edges (drawn lightly when there are many, as for
a DPSM grid) and the block whose network is moving the points.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.model import BlockModel
from ..core.ode import PLOT_SOLVER, SolverSettings, State, solve_units, steps_for
from ..core.partition import Partition
from ..core.sample import Method, prior_sample, sample_ode, sample_sde
from ..errors import PSMError
from ..progress import make_bar
from ..runs.atomic import atomic_write_bytes
from . import use_agg
from .samples import DATA_COLOR, MODEL_COLOR, Extent, data_extent, style_axes


@dataclass(frozen=True)
class Trajectory:
    """Snapshots of a batch of samples on their way from noise to data.

    Attributes:
        times: ``[F]`` times of the snapshots, from 1 down to t0.
        states: ``[F, N, D]`` the points at those times (CPU, float32).
    """

    times: tuple[float, ...]
    states: Tensor


def record_trajectory(
    model: BlockModel,
    x1: Tensor,
    *,
    method: Method = "ode",
    solver: SolverSettings = PLOT_SOLVER,
    frames: int = 60,
    generator: torch.Generator | None = None,
) -> Trajectory:
    """Run the sampler from ``x1`` and keep about ``frames`` evenly spaced snapshots.

    Args:
        model: the assembled blocks.
        x1: starting noise at t = 1, ``[N, *D]``.
        method: ``"ode"`` (probability flow, eq. 3) or ``"sde"`` (reverse SDE, eq. 7).
        solver: ODE solver and steps (the SDE uses ``solver.steps``); an adaptive solver
            reports (and so can show) only the block ends.
        frames: snapshots to keep, the start (t = 1) and the end (t0) included.
        generator: the SDE's Brownian increments (required for ``"sde"``).

    Returns:
        A :class:`Trajectory`.
    """
    if frames < 2:
        raise PSMError(f"frames must be >= 2, got {frames}")
    segs = model.segments()
    total = solve_units(segs, solver) if method == "ode" else sum(steps_for(segs, solver.steps))
    keep = set(np.linspace(0, total, min(frames, total + 1)).round().astype(int).tolist())
    times, states = [1.0], [x1.detach().to("cpu", torch.float32)]
    count = 0

    def hook(t: float, y: State) -> None:
        nonlocal count
        count += 1
        if count in keep:
            times.append(float(t))
            states.append(y[0].detach().to("cpu", torch.float32))

    if method == "ode":
        sample_ode(model, x1, solver=solver, on_step=hook)
    elif method == "sde":
        if generator is None:
            raise PSMError("the SDE trajectory needs a generator")
        sample_sde(model, x1, generator=generator, steps=solver.steps, on_step=hook)
    else:
        raise PSMError(f"unknown method {method!r} (choose from ode, sde)")
    return Trajectory(tuple(times), torch.stack(states))


def animate_samples(
    model: BlockModel,
    path: str | Path,
    *,
    n: int = 1000,
    seed: int = 0,
    method: Method = "ode",
    solver: SolverSettings = PLOT_SOLVER,
    frames: int = 60,
    fps: int = 12,
    data: Tensor | None = None,
    extent: Extent | None = None,
    title: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Path:
    """Write a GIF of ``n`` samples moving from noise to data through the model's blocks.

    Args:
        model: a 2D model.
        path: the GIF to write.
        n: points to animate.
        seed: seed of the starting noise (and of the SDE's increments).
        method: ``"ode"`` or ``"sde"``.
        solver: ODE solver and steps (the SDE uses ``solver.steps``).
        frames: snapshots shown (the last is held for one more second).
        fps: frames per second.
        data: data samples ``[M, 2]`` drawn faintly behind the moving points.
        extent: the window (default: framing both the starting noise and ``data``).
        title: figure title (default: method, solver and steps).
        dtype: the blocks' dtype.
        device: where to integrate.
        progress: show a bar while the frames are rendered.

    Returns:
        The path written.
    """
    shape = model.shape or (2,)
    if tuple(shape) != (2,):
        raise PSMError(f"the animation draws 2D points; this model's samples have shape {shape}")
    gen = torch.Generator(device=device).manual_seed(seed)
    x1 = prior_sample(n, shape, generator=gen, dtype=dtype, device=device)
    traj = record_trajectory(
        model, x1, method=method, solver=solver, frames=frames, generator=gen,
    )  # fmt: skip
    if title is None:
        how = "reverse SDE" if method == "sde" else "ODE"
        title = f"{how}, {solver.describe()}, {n} points"
    return animate_trajectory(
        traj, model.partition, path, data=data, extent=extent, title=title, fps=fps,
        progress=progress,
    )  # fmt: skip


def animate_trajectory(
    traj: Trajectory,
    partition: Partition,
    path: str | Path,
    *,
    data: Tensor | None = None,
    extent: Extent | None = None,
    title: str = "",
    fps: int = 12,
    hold_s: float = 1.0,
    dpi: int = 80,
    progress: bool = True,
) -> Path:
    """Render a recorded trajectory as a GIF (matplotlib animation, Pillow writer), atomically.

    Args:
        traj: the snapshots.
        partition: the model's blocks, drawn on the time bar.
        path: the GIF to write.
        data: data samples ``[M, 2]`` drawn faintly behind the points.
        extent: the window (default: framing the first snapshot and ``data``).
        title: figure title.
        fps: frames per second.
        hold_s: seconds the final frame is held.
        dpi: resolution.
        progress: show a bar while frames are rendered.

    Returns:
        The path written.
    """
    from matplotlib.animation import FuncAnimation, PillowWriter

    plt = use_agg()
    if extent is None:
        extent = data_extent(traj.states[0], *([data] if data is not None else []))
    fig = plt.figure(figsize=(4.4, 5.0))
    grid = fig.add_gridspec(2, 1, height_ratios=[10, 1], hspace=0.35)
    ax = fig.add_subplot(grid[0])
    bar_ax = fig.add_subplot(grid[1])
    if data is not None:
        d = data.detach().to("cpu", torch.float64).numpy()
        ax.scatter(d[:, 0], d[:, 1], s=1, c=DATA_COLOR, alpha=0.2, linewidths=0)
    pts = ax.scatter(*traj.states[0].numpy().T, s=3, c=MODEL_COLOR, alpha=0.6, linewidths=0)
    style_axes(ax, extent)
    if title:
        fig.suptitle(title, fontsize=9)
    heading = ax.set_title("", fontsize=9)
    bar = TimeBar(bar_ax, partition)
    hold = max(0, round(hold_s * fps))
    count = len(traj.times)

    def update(i: int) -> tuple[Any, ...]:
        k = min(i, count - 1)
        t = traj.times[k]
        pts.set_offsets(traj.states[k].numpy())
        block = bar.show(t)
        heading.set_text(f"t = {t:.4f}   block {block} {partition.describe(block)}")
        return (pts, heading)

    anim = FuncAnimation(fig, update, frames=count + hold, blit=False)
    path = Path(path)
    with (
        tempfile.TemporaryDirectory(prefix="psm-gif-") as tmp,
        make_bar(count + hold, desc="gif", unit="frame", disable=not progress, leave=False) as pb,
    ):
        tmp_file = Path(tmp) / "anim.gif"
        anim.save(
            tmp_file, writer=PillowWriter(fps=fps), dpi=dpi,
            progress_callback=lambda i, n: pb.update(1),
        )  # fmt: skip
        plt.close(fig)
        atomic_write_bytes(path, tmp_file.read_bytes())
    return path


class TimeBar:
    """A horizontal bar over ``t ∈ [0, 1]``: block edges, the current block and the current t.

    Args:
        ax: the (flat) axes to draw in.
        partition: the blocks; with more than 40 blocks (e.g. a DPSM grid) edges are faint.
    """

    def __init__(self, ax: Any, partition: Partition) -> None:
        from matplotlib.patches import Rectangle

        self.partition = partition
        ax.set_xlim(0.0, 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
        ax.set_xlabel("t   (0 = data, 1 = noise)", fontsize=7, labelpad=1)
        many = partition.num_blocks > 40
        for e in partition.edges[1:-1]:
            ax.axvline(e, color="k", lw=0.4 if many else 1.0, alpha=0.2 if many else 0.7)
        self.done = Rectangle((1.0, 0.0), 0.0, 1.0, color=MODEL_COLOR, alpha=0.25, lw=0)
        self.block = Rectangle((0.0, 0.0), 0.0, 1.0, fill=False, ec="tab:orange", lw=2.0)
        ax.add_patch(self.done)
        ax.add_patch(self.block)
        (self.marker,) = ax.plot([1.0, 1.0], [0.0, 1.0], color="tab:red", lw=2.0)

    def show(self, t: float) -> int:
        """Move the bar to time ``t``; returns the block that owns ``t``."""
        block = int(self.partition.block_of(torch.tensor(t, dtype=torch.float64)))
        lo, hi = self.partition.interval(block)
        self.done.set_x(t)
        self.done.set_width(1.0 - t)
        self.block.set_x(lo)
        self.block.set_width(hi - lo)
        self.marker.set_xdata([t, t])
        return block
