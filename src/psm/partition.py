"""Partitions of the diffusion time [0, 1] into blocks, one network each.

* ``interval`` partitions (TPSM, Algorithm 1): edges ``0 = t_0 < t_1 < ... < t_K = 1``; block i
  owns ``[t_i, t_{i+1}]`` and its time-conditioned net is trained on ``t ~ U[t_i, t_{i+1}]``.
  K = 1 is SA-DPM (Algorithm 3).
* ``grid`` partitions (DPSM, Algorithm 2): points ``t_1 < ... < t_N`` with ``t_N = 1`` and
  ``t_0 = 0``; block i (0-based) is the time-free net trained at the single time ``t_{i+1}`` and
  owns the cell ``(t_i, t_{i+1}]`` (eqs. 5-6).

Blocks are numbered from 0 in increasing time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import PSMError

PartitionKind = Literal["interval", "grid"]


class PartitionError(PSMError, ValueError):
    """A partition that is not a valid cut of [0, 1]."""


@dataclass(frozen=True)
class Partition:
    """Block boundaries of [0, 1].

    Attributes:
        edges: ``(t_0 = 0, ..., t_K = 1)``, strictly increasing; ``K`` blocks.
        kind: ``"interval"`` (TPSM/SA) or ``"grid"`` (DPSM: block i sits at ``edges[i + 1]``).
    """

    edges: tuple[float, ...]
    kind: PartitionKind = "interval"

    def __post_init__(self) -> None:
        e = self.edges
        if self.kind not in ("interval", "grid"):
            raise PartitionError(f"unknown partition kind {self.kind!r}")
        if len(e) < 2:
            raise PartitionError("a partition needs at least one block (K >= 1)")
        if any(not (0.0 <= x <= 1.0) for x in e):
            raise PartitionError(f"partition points must lie in [0, 1], got {list(e)}")
        if e[0] != 0.0 or e[-1] != 1.0:
            raise PartitionError(f"partition must start at 0 and end at 1, got {list(e)}")
        if any(b <= a for a, b in itertools.pairwise(e)):
            raise PartitionError(f"partition points must be strictly increasing, got {list(e)}")

    @property
    def num_blocks(self) -> int:
        """K, the number of blocks (networks)."""
        return len(self.edges) - 1

    @property
    def time_conditioned(self) -> bool:
        """Whether block nets take t as input (TPSM, SA) or not (DPSM)."""
        return self.kind == "interval"

    def interval(self, block: int) -> tuple[float, float]:
        """The sub-interval ``(t_i, t_{i+1})`` that block ``block`` owns."""
        self._check(block)
        return self.edges[block], self.edges[block + 1]

    def time_point(self, block: int) -> float:
        """DPSM: the fixed time a grid block's net is trained at (the right end of its cell)."""
        self._check(block)
        if self.kind != "grid":
            raise PartitionError("time_point is defined for grid (DPSM) partitions only")
        return self.edges[block + 1]

    def train_range(self, block: int, t0: float) -> tuple[float, float]:
        """Times block ``block`` is trained on, with the floor t0 applied.

        Interval blocks draw ``t ~ U[lo, hi]``; grid blocks return ``(t_i, t_i)``.
        """
        if self.kind == "grid":
            t = max(self.time_point(block), t0)
            return t, t
        lo, hi = self.interval(block)
        lo = max(lo, t0)
        if lo >= hi:
            raise PartitionError(
                f"block {block} [{self.edges[block]}, {hi}] lies below the time floor t0={t0}"
            )
        return lo, hi

    def block_of(self, t: Tensor | float) -> Tensor:
        """Index of the block that owns each time ``t`` (any shape), a ``long`` tensor.

        Interval blocks own ``[t_i, t_{i+1})`` (the last one also owns 1); grid blocks own
        ``(t_i, t_{i+1}]`` (the first one also owns 0).
        """
        t = torch.as_tensor(t)
        if not t.is_floating_point():
            t = t.to(torch.float64)
        # compare in t's own precision, so that a float32 t equal to an edge counts as on it
        inner = torch.tensor(self.edges[1:-1], dtype=t.dtype, device=t.device)
        idx = torch.searchsorted(inner, t.contiguous(), right=self.kind == "interval")
        return idx.clamp_(0, self.num_blocks - 1)

    def describe(self, block: int) -> str:
        """Human-readable span of a block, e.g. ``[0.1, 0.2]`` or ``t=0.01``."""
        if self.kind == "grid":
            return f"t={self.time_point(block):.4g}"
        lo, hi = self.interval(block)
        return f"[{lo:.4g}, {hi:.4g}]"

    def _check(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise PartitionError(f"block {block} out of range 0..{self.num_blocks - 1}")


def equal(num_blocks: int) -> Partition:
    """K equal blocks ``[i/K, (i+1)/K]`` (TPSM_C is ``equal(200)``; ``equal(1)`` is SA-DPM)."""
    if num_blocks < 1:
        raise PartitionError(f"number of blocks must be >= 1, got {num_blocks}")
    return Partition(tuple(i / num_blocks for i in range(num_blocks)) + (1.0,), "interval")


def splits(points: Sequence[float]) -> Partition:
    """Explicit split points, e.g. TPSM_A ``[0, 0.1, 1]`` or TPSM_B ``[0, 0.02, 0.1, 0.3, 1]``."""
    return Partition(tuple(float(p) for p in points), "interval")


def grid(points: int | Sequence[float]) -> Partition:
    """DPSM grid: N equal points ``t_i = i/N`` (i = 1..N), or explicit ``t_1 < ... < t_N = 1``."""
    if isinstance(points, int):
        if points < 1:
            raise PartitionError(f"number of grid points must be >= 1, got {points}")
        return Partition(tuple(i / points for i in range(points)) + (1.0,), "grid")
    pts = [float(p) for p in points]
    if pts and pts[0] <= 0.0:
        raise PartitionError(f"grid points must be > 0, got {pts}")
    return Partition((0.0, *pts), "grid")
