"""Partitions of [0, 1]: paper splits, block lookup, time floors, bad input."""

from __future__ import annotations

import pytest
import torch

from psm.core.partition import Partition, PartitionError, equal, grid, splits


def test_paper_partitions():
    assert equal(1).edges == (0.0, 1.0)
    assert equal(200).num_blocks == 200
    assert splits([0, 0.1, 1]).interval(1) == (0.1, 1.0)
    b = splits([0, 0.02, 0.1, 0.3, 1])
    assert [b.interval(i) for i in range(4)] == [(0, 0.02), (0.02, 0.1), (0.1, 0.3), (0.3, 1)]


def test_block_of_intervals():
    p = splits([0, 0.02, 0.1, 0.3, 1])
    t = torch.tensor([1e-4, 0.0199, 0.02, 0.05, 0.1, 0.29, 0.3, 0.999, 1.0])
    assert p.block_of(t).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert p.block_of(0.5).item() == 3
    # every t lands inside its block
    ts = torch.rand(1000)
    for t_, b in zip(ts.tolist(), p.block_of(ts).tolist()):
        lo, hi = p.interval(b)
        assert lo <= t_ <= hi


def test_grid_blocks_sit_at_their_right_edges():
    g = grid(4)
    assert [g.time_point(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert not g.time_conditioned and equal(3).time_conditioned
    # cell (t_i, t_{i+1}] belongs to the net at t_{i+1}
    assert g.block_of(torch.tensor([1e-4, 0.25, 0.2501, 0.5, 1.0])).tolist() == [0, 0, 1, 1, 3]
    assert g.train_range(2) == (0.75, 0.75)
    assert grid([0.1, 0.5, 1.0]).time_point(0) == 0.1


def test_train_range_applies_time_floor():
    assert equal(10).train_range(0) == (1e-4, 0.1)
    assert equal(10, t0=1e-3).train_range(0) == (1e-3, 0.1)
    assert equal(10).train_range(3) == pytest.approx((0.3, 0.4))
    assert grid([5e-5, 1.0]).train_range(0) == (1e-4, 1e-4)  # a grid time below t0 sits at t0
    with pytest.raises(PartitionError, match="wholly below t0"):
        splits([0, 1e-5, 1])
    with pytest.raises(PartitionError, match="t0 must lie in"):
        equal(2, t0=0.0)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: splits([0, 0.3, 0.2, 1]), "strictly increasing"),
        (lambda: splits([0, 0.5, 1.5]), r"\[0, 1\]"),
        (lambda: splits([0.1, 0.5, 1]), "start at 0"),
        (lambda: splits([0]), "at least one block"),
        (lambda: equal(0), ">= 1"),
        (lambda: grid(0), ">= 1"),
        (lambda: grid([0.0, 0.5, 1.0]), "> 0"),
        (lambda: Partition((0.0, 1.0), "cells"), "unknown partition kind"),
    ],
)
def test_bad_partitions(make, match):
    with pytest.raises(PartitionError, match=match):
        make()


def test_block_range_checked():
    with pytest.raises(PartitionError, match="out of range"):
        equal(3).interval(3)


def test_geometric_blocks_crowd_near_zero():
    from psm.core.partition import geometric

    g = geometric(10, 1e-3)
    assert g.num_blocks == 10 and g.edges[:2] == (0.0, 1e-3) and g.edges[-1] == 1.0
    ratios = [b / a for a, b in zip(g.edges[1:-1], g.edges[2:])]
    assert max(ratios) - min(ratios) < 1e-9 and ratios[0] == pytest.approx(1000 ** (1 / 9))
    with pytest.raises(PartitionError, match="first edge"):
        geometric(4, 1.5)
