"""The dataset interface shared by every data source psm trains on, and the ``data:`` spec."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import Tensor

from ..errors import PSMError
from ..spec import Spec


class DataError(PSMError, ValueError):
    """Bad data input: unknown dataset name, unreadable or malformed data file."""


class Dataset(ABC):
    """A source of training points and held-out test points.

    Attributes:
        name: the config name.
        shape: the shape of one point (``(2,)`` for the 2D sets, ``(C, H, W)`` for images).
        entropy: the true differential entropy in nats (the NLL floor), when known.
    """

    name: str = ""
    shape: tuple[int, ...] = (2,)
    entropy: float | None = None

    @property
    def numel(self) -> int:
        """Numbers per point, ``prod(shape)`` (the D of the likelihood's ``D ln 2``)."""
        return math.prod(self.shape)

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` fresh training points, ``[n, *shape]``, on ``generator.device``.

        Everything random is drawn from ``generator`` so that a block's batches are a pure
        function of its seed (the ensemble trainer relies on this).
        """

    def test_set(self, n: int, seed: int = 12345) -> Tensor:
        """Held-out points for NLL evaluation, ``[n, *shape]`` (n is capped for finite sets)."""
        g = torch.Generator().manual_seed(seed)
        return self.sample(n, g)

    @property
    def has_density(self) -> bool:
        """Whether :meth:`log_prob` gives the exact data log-density."""
        return False

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact data log-density per point, ``[n]``; raises when there is none."""
        raise DataError(f"dataset {self.name!r} has no exact density")


class DataSpec(Spec):
    """The ``data:`` section of a config: one registered member per kind of source."""

    @abstractmethod
    def build(self, *, seed: int) -> Dataset:
        """The dataset (``seed`` fixes any train/test split drawn at random).

        Raises:
            DataError: a missing or malformed source, in one line.
        """

    def files(self) -> list[Path]:
        """The files the dataset reads: the run records their content digest and refuses to
        go on when one changes."""
        return []
