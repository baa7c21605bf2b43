"""The dataset interface shared by every data source psm trains on."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..errors import PSMError


class DataError(PSMError, ValueError):
    """Bad data input: unknown dataset name, unreadable or malformed points file."""


class Dataset(ABC):
    """A source of training points and held-out test points.

    Attributes:
        name: the config name.
        dim: dimension of one point (2 for the toys).
        entropy: the true differential entropy in nats (the NLL floor), when known.
    """

    name: str = ""
    dim: int = 2
    entropy: float | None = None

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Draw ``n`` fresh training points, ``[n, dim]``, on ``generator.device``.

        Everything random is drawn from ``generator`` so that a block's batches are a pure
        function of its seed (the ensemble trainer relies on this).
        """

    def test_set(self, n: int, seed: int = 12345) -> Tensor:
        """Held-out points for NLL evaluation, ``[n, dim]`` (n is capped for finite sets)."""
        g = torch.Generator().manual_seed(seed)
        return self.sample(n, g)

    @property
    def has_density(self) -> bool:
        """Whether :meth:`log_prob` gives the exact data log-density."""
        return False

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact data log-density per point, ``[n]``; raises when there is none."""
        raise DataError(f"dataset {self.name!r} has no exact density")
