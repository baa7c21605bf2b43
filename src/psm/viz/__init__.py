"""Plots: per-block loss curves, density heat maps, sample scatters, evolution animations.

matplotlib is imported lazily with the non-interactive Agg backend, so plotting works on
machines without a screen.
"""

from __future__ import annotations


def use_agg():
    """Import matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
