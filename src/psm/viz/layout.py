"""Panel grids: several same-sized panels in rows of at most :data:`MAX_COLUMNS`.

A figure of many panels in one row (eight density maps: 3552 x 468 pixels) is unreadable at page
width; :func:`panel_grid` wraps them into as few rows as the column limit allows, with the panels
spread evenly over the rows (6 panels: 2 rows of 3, not 4 + 2).
"""

from __future__ import annotations

import math
from typing import Any

MAX_COLUMNS = 4
"""Most panels in one row of a figure."""


def grid_shape(n: int, max_columns: int = MAX_COLUMNS) -> tuple[int, int]:
    """``(rows, columns)`` for ``n`` panels: the fewest rows with at most ``max_columns`` panels
    each, and the fewest columns that hold ``n`` panels in those rows.

    Raises:
        ValueError: ``n < 1`` or ``max_columns < 1``.
    """
    if n < 1 or max_columns < 1:
        raise ValueError(f"need n >= 1 panels and max_columns >= 1, got {n} and {max_columns}")
    rows = math.ceil(n / max_columns)
    return rows, math.ceil(n / rows)


def panel_grid(
    plt: Any,
    n: int,
    *,
    panel_size: tuple[float, float] = (3.2, 3.3),
    extra_width: float = 0.0,
    extra_height: float = 0.4,
    max_columns: int = MAX_COLUMNS,
    layout: str | None = "constrained",
) -> tuple[Any, list[Any]]:
    """A figure with ``n`` panels in a grid of at most ``max_columns`` per row.

    Args:
        plt: ``matplotlib.pyplot`` (from :func:`psm.viz.use_agg`).
        n: panels wanted.
        panel_size: inches ``(width, height)`` of one grid cell (title included).
        extra_width: inches added to the width (a colour bar).
        extra_height: inches added to the height (a figure title).
        max_columns: most panels per row.
        layout: matplotlib layout engine.

    Returns:
        ``(figure, axes)``: the first ``n`` axes in reading order; the grid's unused cells
        (the last row's tail) are removed.
    """
    rows, cols = grid_shape(n, max_columns)
    fig, grid = plt.subplots(
        rows,
        cols,
        figsize=(panel_size[0] * cols + extra_width, panel_size[1] * rows + extra_height),
        squeeze=False,
        layout=layout,
    )
    axes = list(grid.ravel())
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]
