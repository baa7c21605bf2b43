"""What every block net is: ``net(x [B, *D], t [B]) -> output [B, *D]``, built from a spec.

Time-free nets (DPSM) accept ``t`` and ignore it, so samplers, the trainer and the block router
treat all nets alike.
"""

from __future__ import annotations

from abc import abstractmethod

from torch import nn

from ..spec import Spec


class NetSpec(Spec):
    """The ``net:`` section of a config: one registered member per architecture."""

    @abstractmethod
    def build(self, shape: tuple[int, ...], *, time_conditioned: bool) -> nn.Module:
        """A fresh net for points of ``shape`` (``(2,)``, ``(C, H, W)``).

        Args:
            shape: the shape of one data point.
            time_conditioned: False for DPSM's time-free nets (one per grid time).

        Raises:
            ValueError: the architecture cannot take points of this shape (one line).
        """
