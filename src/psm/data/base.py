"""The dataset interface shared by every data source psm trains on, its optional capabilities,
and the ``data:`` spec.

Every source is a :class:`Dataset` (``sample``, ``test_set``, ``entropy``, ``has_density``,
``log_prob``). What only some sources can do is a capability, a :class:`~typing.Protocol`
checked with ``isinstance`` where a command needs it (never ``hasattr``):

* :class:`ExactDensity`: closed-form noised marginals ``p_t`` and their scores (the 2D
  mixtures): the NLL floor at t0 and the exact per-block KL of ``psm kl``.
* :class:`Quantized`: data on L discrete levels (images): bits/dim of an NLL in nats.
* :class:`PixelMap`: a map from model space back to pixels in ``[0, 1]`` (sample grids).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol, runtime_checkable

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

    def test_set(self, n: int, seed: int = 12345, dequantize: bool | None = None) -> Tensor:
        """Held-out points for NLL evaluation, ``[n, *shape]`` (n is capped for finite sets).

        Args:
            n: how many points (at most, for finite sets).
            seed: seeds whatever the draw needs (fresh points, a subset, dequantization noise).
            dequantize: :class:`Quantized` data only: ``False`` gives the levels without noise
                (the authors' convention), ``True`` with; ``None``: the dataset's own.

        Raises:
            DataError: ``dequantize`` given for data without levels.
        """
        self._no_levels(dequantize)
        g = torch.Generator().manual_seed(seed)
        return self.sample(n, g)

    def _no_levels(self, dequantize: bool | None) -> None:
        if dequantize is not None:
            raise DataError(f"dataset {self.name!r} has no levels to dequantize")

    @property
    def has_density(self) -> bool:
        """Whether :meth:`log_prob` gives the exact data log-density."""
        return False

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact data log-density per point, ``[n]``; raises when there is none."""
        raise DataError(f"dataset {self.name!r} has no exact density")


@runtime_checkable
class ExactDensity(Protocol):
    """Data whose noised marginals have a closed form: ``x_t = α x0 + σ ε``, x0 from the data.

    The 2D mixtures (:class:`~psm.data.mixture.Mixture`) are; ``psm kl`` and the reports'
    NLL floor at t0 need it.
    """

    def marginal_log_prob(self, x: Tensor, alpha: float, sigma: float) -> Tensor:
        """Exact ``log p_t(x)`` at points ``x [n, *shape]`` → ``[n]`` float64 (σ = 0: the data's
        own density)."""
        ...

    def marginal_score(
        self, x: Tensor, alpha: float, sigma: float, *, differentiable: bool = False
    ) -> Tensor:
        """Exact score ``∇ log p_t(x)`` at points ``x [n, *shape]`` → ``[n, *shape]`` float64
        (σ > 0; ``differentiable``: a graph from ``x`` to the score is kept)."""
        ...


@runtime_checkable
class Quantized(Protocol):
    """Data on ``levels`` discrete values per number (images), mapped to the model's space by
    ``y = s (x - m)``: an NLL in nats has a bits/dim.

    Attributes:
        levels: L, the number of intensity levels.
        log_scale_per_dim: ``log s``, the map's log-Jacobian per dimension.
    """

    levels: int
    log_scale_per_dim: float

    def bits_per_dim(self, nll_nats: Tensor | float) -> Tensor | float:
        """Bits/dim from the NLL in nats of one model-space point:
        ``(nll - D log s) / (D ln 2) + log2 L``."""
        ...


@runtime_checkable
class PixelMap(Protocol):
    """Data with a map from model space back to pixels (image grids of samples)."""

    def to_unit(self, y: Tensor, dequantize: bool | None = None) -> Tensor:
        """Model-space points ``[n, C, H, W]`` → pixels in ``[0, 1]``, same shape."""
        ...


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
