"""Assembling blocks into one model: routing, DPSM fields, and loading a run."""

from __future__ import annotations

import pytest
import torch

from psm.core.model import BlockModel
from psm.core.partition import Segment, grid, splits
from psm.core.process import make_process
from psm.errors import IncompleteRunError, PSMError
from psm.runs.checkpoint import load_weights, save_weights
from psm.runs.inference import load_model
from psm.training.train import train_block

D64 = torch.float64
VP = make_process("vp")


def tagged(b: int):
    """A block whose output is its own id plus the time it was called with (in column 1)."""
    return lambda x, t: torch.stack([torch.full_like(t, float(b)), t], dim=1)


def smooth(b: int):
    """A block with a non-trivial output depending on x, t and its id."""
    return lambda x, t: torch.sin(x * (b + 1)) + t[:, None] * x.roll(1, dims=1)


# ---------------------------------------------------------------------- structure
def test_segments_apply_the_time_floor_and_skip_blocks_below_it():
    model = BlockModel(VP, splits([0, 0.3, 1]), [tagged(b) for b in range(2)])
    assert model.segments() == [Segment(0, 1e-4, 0.3), Segment(1, 0.3, 1.0)]
    assert model.t0 == 1e-4
    # a DPSM cell that ends below t0 is left out of the integration
    low = BlockModel(VP, grid([5e-5, 0.5, 1.0]), [tagged(b) for b in range(3)])
    assert low.segments() == [Segment(1, 1e-4, 0.5), Segment(2, 0.5, 1.0)]
    g = BlockModel(VP, grid(4), [tagged(b) for b in range(4)])
    assert [s.block for s in g.segments()] == [0, 1, 2, 3]
    assert g.segments()[0] == Segment(0, 1e-4, 0.25)
    assert [g.net_time(b) for b in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_wrong_block_count_and_field_are_refused():
    with pytest.raises(ValueError, match="blocks"):
        BlockModel(VP, splits([0, 0.5, 1]), [tagged(0)])
    with pytest.raises(ValueError, match="grid_field"):
        BlockModel(VP, grid(2), [tagged(0), tagged(1)], grid_field="cubic")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- TPSM routing
def test_interval_routing_follows_block_of_and_the_explicit_index():
    part = splits([0, 0.1, 0.5, 1])
    model = BlockModel(VP, part, [tagged(b) for b in range(3)])
    t = torch.tensor([0.05, 0.7, 0.1, 0.3, 1.0, 1e-4], dtype=D64)
    x = torch.zeros(6, 2, dtype=D64)
    out = model.output(x, t)
    torch.testing.assert_close(out[:, 0], part.block_of(t).to(D64))
    torch.testing.assert_close(out[:, 1], t)  # TPSM blocks see the real t
    # an explicit block wins, even at a shared boundary (t = 0.1 routes to block 1)
    torch.testing.assert_close(model.output(x, 0.1, block=0)[:, 0], torch.zeros(6, dtype=D64))


def test_field_score_and_sde_are_the_process_applied_to_the_block():
    for name in ("vp", "ot"):
        process = make_process(name)
        model = BlockModel(process, splits([0, 0.4, 1]), [smooth(0), smooth(1)])
        x = torch.randn(5, 2, dtype=D64)
        t = torch.tensor([0.1, 0.39, 0.4, 0.8, 0.99], dtype=D64)
        b = (t >= 0.4).long()
        out = torch.where(b[:, None] == 1, smooth(1)(x, t), smooth(0)(x, t))
        torch.testing.assert_close(model.field(x, t), process.velocity(out, x, t))
        torch.testing.assert_close(model.score(x, t), process.score(out, x, t))
        drift, g = model.reverse_sde(x[:2], t[:2], 0)
        want_drift, want_g = process.reverse_sde(out[:2], x[:2], t[:2])
        torch.testing.assert_close(drift, want_drift)
        torch.testing.assert_close(g, want_g)


# ---------------------------------------------------------------------- DPSM fields
def test_dpsm_constant_field_evaluates_everything_at_the_grid_time():
    model = BlockModel(VP, grid(4), [smooth(b) for b in range(4)], grid_field="constant")
    x = torch.randn(3, 2, dtype=D64)
    for t in (0.26, 0.4, 0.5):  # all in cell (0.25, 0.5] of block 1
        tau = torch.full((3,), 0.5, dtype=D64)
        want = VP.velocity(smooth(1)(x, tau), x, tau)
        torch.testing.assert_close(model.field(x, t), want)
        torch.testing.assert_close(model.field(x, t, block=1), want)
    tagged_model = BlockModel(VP, grid(4), [tagged(b) for b in range(4)])
    torch.testing.assert_close(tagged_model.output(x, 0.3)[:, 1], torch.full((3,), 0.5, dtype=D64))


def test_dpsm_linear_field_interpolates_neighbouring_nets():
    model = BlockModel(VP, grid(4), [smooth(b) for b in range(4)], grid_field="linear")
    x = torch.randn(3, 2, dtype=D64)

    def at(b: int, tau: float):
        return smooth(b)(x, torch.full((3,), tau, dtype=D64))

    # at a grid time the output is that net's own; halfway it is the mean of the two nets
    torch.testing.assert_close(model.output(x, 0.5), at(1, 0.5))
    torch.testing.assert_close(model.output(x, 0.625), 0.5 * (at(1, 0.5) + at(2, 0.75)))
    # continuous across a cell boundary
    below, above = model.output(x, 0.75, block=2), model.output(x, 0.75 + 1e-9, block=3)
    torch.testing.assert_close(below, above, rtol=0, atol=1e-7)
    # the process is applied at the real t
    t = torch.full((3,), 0.625, dtype=D64)
    torch.testing.assert_close(model.field(x, t), VP.velocity(model.output(x, t), x, t))


@pytest.mark.parametrize("name", ["vp", "ot"])
def test_dpsm_linear_first_cell_holds_net0s_score(name):
    process = make_process(name)
    model = BlockModel(process, grid(4), [smooth(b) for b in range(4)], grid_field="linear")
    x = torch.randn(3, 2, dtype=D64)
    tau = torch.full((3,), 0.25, dtype=D64)
    score_at_tau = process.score(smooth(0)(x, tau), x, tau)
    for t in (1e-3, 0.1, 0.25):
        torch.testing.assert_close(model.score(x, t), score_at_tau)
    # continuous into the second cell
    torch.testing.assert_close(model.output(x, 0.25, block=0), model.output(x, 0.25, block=1))


# ---------------------------------------------------------------------- loading a run
def _finish(run, blocks, step=None):
    """Record ``blocks`` as trained the way train.py does: final weights, then status done."""
    for b in blocks:
        torch.manual_seed(b)
        net = run.parts.new_net()
        save_weights(run, b, net.state_dict(), step or run.config.train.steps)
        run.ledger.write(b, state="done", step=step or run.config.train.steps)


def test_load_model_refuses_missing_blocks_and_names_them(make_run):
    run = make_run(partition={"kind": "equal", "blocks": 4})
    _finish(run, [0, 2])
    with pytest.raises(IncompleteRunError, match=r"1 \(pending\), 3 \(pending\)") as e:
        load_model(run)
    assert isinstance(e.value, PSMError)


def test_load_model_refuses_unfinished_blocks(make_run):
    run = make_run(partition={"kind": "equal", "blocks": 3})
    _finish(run, [0, 1])
    _finish(run, [2], step=run.config.train.steps - 1)  # weights written, but short of the target
    with pytest.raises(IncompleteRunError, match=r"block\(s\) not done: 2"):
        load_model(run.path)
    _finish(run, [2])
    run.ledger.write(1, state="running")
    with pytest.raises(IncompleteRunError, match=r"not done: 1"):
        load_model(run)
    run.ledger.write(1, state="done")
    run.layout.weights(0).unlink()  # status says done but the weights are gone
    with pytest.raises(IncompleteRunError, match=r"not done: 0"):
        load_model(run)


def test_load_model_builds_the_trained_nets(make_run):
    run = make_run(partition={"kind": "grid", "points": 3})
    for b in range(3):
        assert train_block(run, b).state == "done"
    model = load_model(run.path, dtype=D64, grid_field="linear")
    assert model.is_grid and model.grid_field == "linear" and model.shape == (2,)
    assert model.num_blocks == 3 and model.t0 == run.config.partition.t0
    x = torch.randn(5, 2, dtype=D64)
    for b, net in enumerate(model.blocks):
        assert not net.training
        assert all(not p.requires_grad and p.dtype == D64 for p in net.parameters())
        fresh = run.parts.new_net().double()
        load_weights(run, b, fresh)
        tau = torch.full((5,), model.net_time(b), dtype=D64)
        torch.testing.assert_close(net(x, tau), fresh(x, tau))
        # at its own grid time the linear field's output is the net's own
        torch.testing.assert_close(model.output(x, tau, block=b), fresh(x, tau))
