"""``mse``: the paper's objective (uniform t in the block, plain MSE; eq. 26, Algorithms 1-2)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..process import Process
from .base import Objective, ObjectiveSpec


class MSEObjective(Objective):
    """The paper's objective: ``t ~ U[t_lo, t_hi]`` (Algorithm 1), the grid point's own time
    when ``t_lo = t_hi`` (Algorithm 2), unweighted (eq. 26)."""

    def times(
        self, n: int, generator: torch.Generator, device: torch.device
    ) -> tuple[Tensor, Tensor | None]:
        if self.t_hi > self.t_lo:
            t = torch.empty(n, device=device).uniform_(self.t_lo, self.t_hi, generator=generator)
        else:
            t = torch.full((n,), self.t_lo, device=device)
        return t, None


class MSESpec(ObjectiveSpec):
    """``train.objective: {name: mse}``: uniform times in the block, plain MSE (the default)."""

    name: Literal["mse"] = "mse"

    def build(self, process: Process, t_lo: float, t_hi: float) -> Objective:
        return MSEObjective(process, t_lo, t_hi)
