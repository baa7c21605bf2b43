"""Data sources: the paper's 2D sets, classic 2D toys, and the user's own points.

Each kind of source has a spec (the ``data:`` section of a config) next to its code;
:data:`DATASETS` lists the specs, one line each. ``DATASETS.validate({"name": "ty"}).build(seed=0)``
builds a :class:`Dataset`.
"""

from __future__ import annotations

from ..spec import Registry
from .base import DataError, Dataset, DataSpec, ExactDensity, PixelMap, Quantized
from .images import ImageData
from .mixture import Mixture, paper_toy
from .points import PointsData
from .toy import TOYS, ToyData

DATASETS: Registry[DataSpec] = Registry("dataset", [ToyData, PointsData, ImageData], default="ty")


def make_dataset(name: str, *, seed: int = 0, **fields: object) -> Dataset:
    """Build a dataset by its config name and fields, e.g. ``make_dataset("hg")`` or
    ``make_dataset("points", path="p.npy")`` (``seed`` fixes a random train/test split).

    Raises:
        DataError: an unknown name, a bad field or a bad source, in one line.
    """
    from ..spec import SpecError

    try:
        spec = DATASETS.validate({"name": name, **fields})
    except SpecError as e:
        where = f"data.{e.loc}: " if e.loc else ""
        raise DataError(f"{where}{e.message}") from None
    return spec.build(seed=seed)


__all__ = [
    "DATASETS", "TOYS", "DataError", "DataSpec", "Dataset", "ExactDensity", "Mixture", "PixelMap",
    "Quantized", "make_dataset", "paper_toy",
]  # fmt: skip
