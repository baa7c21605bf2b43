"""``data: {name: ty | hg | 8gaussians | ...}``: the synthetic 2D sets, exact densities."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from .base import Dataset, DataSpec
from .classic import CLASSIC
from .mixture import paper_toy

TOYS: dict[str, Callable[..., Dataset]] = {
    "ty": lambda center=True: paper_toy("TY", center=center),
    "hg": lambda center=True: paper_toy("HG", center=center),
    **CLASSIC,  # 8gaussians, checkerboard, moons, pinwheel, rings, spirals, swissroll
}
"""Name -> builder ``(center=...) -> Dataset`` for every synthetic set."""

ToyName = Literal[
    "ty", "hg", "8gaussians", "checkerboard", "moons", "pinwheel", "rings", "spirals", "swissroll"
]


class ToyData(DataSpec):
    """The paper's TY and HG (``toy2d.json``) and the classic 2D sets."""

    name: ToyName = "ty"
    center: bool = True  # subtract the exact mean (the paper centres TY and HG)

    def build(self, *, seed: int) -> Dataset:
        return TOYS[self.name](center=self.center)
