"""Data sources: the paper's 2D sets, classic 2D toys, and the user's own points.

``make_dataset(name, ...)`` builds a :class:`Dataset` by its config name.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import DataError, Dataset
from .classic import CLASSIC
from .mixture import Mixture, paper_toy

__all__ = ["DATASETS", "DataError", "Dataset", "Mixture", "dataset_names", "make_dataset"]

# name -> builder(center=...) for the synthetic sets; "points" (a user file) is handled apart.
DATASETS: dict[str, Callable[..., Dataset]] = {
    "ty": lambda center=True: paper_toy("TY", center=center),
    "hg": lambda center=True: paper_toy("HG", center=center),
    **CLASSIC,  # 8gaussians, checkerboard, moons, pinwheel, rings, spirals, swissroll
}


def dataset_names() -> list[str]:
    """Every name ``make_dataset`` accepts."""
    return sorted([*DATASETS, "points"])


def make_dataset(
    name: str,
    *,
    center: bool = True,
    path: str | None = None,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """Build a dataset by name.

    Args:
        name: one of :func:`dataset_names`.
        center: subtract the exact mean (synthetic sets) or the train mean (points files).
        path: ``.npy`` or ``.csv`` file of points, for ``name="points"``.
        test_fraction: share of a points file held out for testing.
        seed: seed of the train/test split of a points file.
    """
    if name == "points":
        from .points import PointsDataset

        if path is None:
            raise DataError("data.path is required for data.name=points (a .npy or .csv file)")
        return PointsDataset(path, test_fraction=test_fraction, center=center, seed=seed)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (choose from {', '.join(dataset_names())})")
    return DATASETS[name](center=center)
