"""The parts of a run — dataset, process, partition, and the nets' builder — built once.

A worker builds a run's :class:`Parts` once and hands them down to every block it trains or
evaluates, so a 1000-block DPSM run does not load its data 1000 times per worker.
"""

from __future__ import annotations

from functools import cached_property

from torch import nn

from ..core.partition import Partition
from ..core.process import Process
from ..data import Dataset
from ..errors import ConfigError
from .config import RunConfig


class Parts:
    """Lazily built, then cached, parts of one run configuration.

    Args:
        config: the run's config.
        shape: the shape of one data point when already known (e.g. recorded in the run
            directory), so that nets can be built without loading the data.
    """

    def __init__(self, config: RunConfig, *, shape: tuple[int, ...] | None = None) -> None:
        self.config = config
        self._shape = tuple(shape) if shape is not None else None

    @cached_property
    def dataset(self) -> Dataset:
        """The training/test data (``data:``), split by ``train.seed`` where it splits."""
        return self.config.data.build(seed=self.config.train.seed)

    @cached_property
    def process(self) -> Process:
        """The forward process (``process:``)."""
        return self.config.process.build()

    @cached_property
    def partition(self) -> Partition:
        """The blocks and the time floor t0 (``partition:``)."""
        return self.config.partition.build()

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one data point."""
        if self._shape is None:
            self._shape = tuple(self.dataset.shape)
        return self._shape

    def new_net(self, block: int | None = None) -> nn.Module:
        """A fresh net for block ``block`` (``net:`` with the block's ``blocks:`` entry merged
        on; None: the run's own ``net:``), time-conditioned unless the partition is a grid.

        Raises:
            ConfigError: the net cannot take points of this shape (one line).
        """
        tc = self.partition.time_conditioned
        spec = self.config.net_for(block)
        try:
            return spec.build(self.shape, time_conditioned=tc)
        except ValueError as e:
            where = "" if self.config.override(block) is None else f" (block {block})"
            raise ConfigError(f"net {spec.name}{where}: {e}") from None

    def prediction(self, block: int) -> str:
        """What block ``block``'s net outputs (its objective's ``prediction``, else the
        process's)."""
        return self.config.objective_for(block).block_process(self.process).prediction

    def check(self) -> None:
        """Build the data and one net, so that a bad source or a net that cannot take the data
        fails (in one line) before anything is written."""
        _ = self.dataset
        self.new_net()
        for o in self.config.blocks:  # every overridden net too
            self.new_net(o.first)
