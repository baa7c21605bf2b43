"""Per-block training loss curves of a run."""

from __future__ import annotations

import json
from pathlib import Path

from ..runs.run import Run
from . import use_agg

MARKERS_BELOW = 20
"""Blocks with fewer logged points than this are drawn with markers."""


def read_metrics(run: Run, block: int) -> tuple[list[int], list[float]]:
    """Steps and losses logged for a block (the last record of a step wins)."""
    path = run.layout.metrics(block)
    by_step: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                by_step[int(rec["step"])] = float(rec["loss"])
            except (ValueError, KeyError, TypeError):
                continue
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_loss_curves(run: Run, out: str | Path | None = None) -> Path:
    """Write a PNG with one loss curve per block, coloured by the block's time.

    Args:
        run: the run.
        out: PNG path (default ``<run>/loss_curves.png``).

    Returns:
        The path written.
    """
    plt = use_agg()
    from matplotlib import cm
    from matplotlib.colors import Normalize

    out = Path(out) if out is not None else run.path / "loss_curves.png"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    norm = Normalize(0.0, 1.0)
    cmap = cm.viridis
    k = run.num_blocks
    plotted = 0
    for b in range(k):
        steps, losses = read_metrics(run, b)
        if not steps:
            continue
        lo, hi = run.partition.interval(b)
        label = f"block {b} {run.partition.describe(b)}" if k <= 10 else None
        # a block with only a few logged points gets markers: a one-point line is invisible
        marker = "o" if len(steps) < MARKERS_BELOW else None
        ax.plot(steps, losses, color=cmap(norm(0.5 * (lo + hi))), lw=1.0, marker=marker,
                markersize=3, label=label)  # fmt: skip
        plotted += 1
    ax.set_yscale("log")
    ax.set_xlabel("step (per block)")
    ax.set_ylabel("training loss (MSE, window mean)")
    ax.set_title(f"{run.config.name}: {plotted}/{k} blocks")
    ax.grid(alpha=0.3, which="both")
    if k <= 10 and plotted:
        ax.legend(fontsize=7, ncol=2)
    elif plotted:
        fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="block time t")
    fig.tight_layout()
    import io

    from ..runs.atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())
    return out
