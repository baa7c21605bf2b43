"""The exact trace in closed form (issue 21): the MLP's ``output_and_trace`` and the block
model's ``field_divergence`` against autograd's D backward passes (``divergence``)."""

from __future__ import annotations

import pytest
import torch

import psm.nets.mlp as mlp
from psm.core import likelihood
from psm.core.likelihood import divergence, log_likelihood
from psm.core.model import BlockModel
from psm.core.ode import SolverSettings
from psm.core.partition import equal, grid
from psm.core.process import make_process
from psm.nets.mlp import ACTIVATION_DERIVATIVES, PaperMLP

D64 = torch.float64


def make_net(shape=2, hidden=(16, 16), *, seed=0, **kw) -> PaperMLP:
    torch.manual_seed(seed)
    # input_scale 3 spreads the pre-activations over both sides of every kink
    return PaperMLP(shape, hidden, input_scale=3.0, **kw).eval().requires_grad_(False)


def points(shape, n=64, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(n, *shape, generator=gen, dtype=dtype)
    return x, torch.rand(n, generator=gen, dtype=dtype)


def assert_trace_close(got, want, rtol):
    # relative to the trace's scale (single traces may cross zero)
    assert (got - want).abs().max() <= rtol * want.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize("activation", sorted(ACTIVATION_DERIVATIVES))
@pytest.mark.parametrize("hidden", [(16,), (16, 24), (16, 24, 12)])
def test_mlp_trace_equals_autograd(activation, hidden):
    net = make_net(hidden=hidden, activation=activation)
    x, t = points((2,))
    want_out, want_tr = divergence(lambda z: net(z, t), x)
    out, tr = net.output_and_trace(x, t)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    assert_trace_close(tr, want_tr, 1e-5)
    assert want_tr.std() > 0  # a trace that varies over the points: not a trivial case


@pytest.mark.parametrize("activation", sorted(ACTIVATION_DERIVATIVES))
def test_paper_mlp_trace_in_float64_is_autograds_to_rounding(activation):
    net = make_net(hidden=(100, 150, 100), activation=activation).double()
    x, t = points((2,), dtype=D64)
    want_out, want_tr = divergence(lambda z: net(z, t), x)
    out, tr = net.output_and_trace(x, t)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    assert_trace_close(tr, want_tr, 1e-11)


@pytest.mark.parametrize(
    ("shape", "time_conditioned"), [((3,), True), ((3,), False), ((1, 2, 2), True)]
)
def test_other_shapes_and_time_free_nets(shape, time_conditioned):
    net = make_net(shape, time_conditioned=time_conditioned, activation="silu")
    x, t = points(shape)
    want_out, want_tr = divergence(lambda z: net(z, t), x)
    out, tr = net.output_and_trace(x, t if time_conditioned else None)
    assert out.shape == x.shape
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    assert_trace_close(tr, want_tr, 1e-5)


def test_chunks_of_the_batch_give_the_same_result(monkeypatch):
    net = make_net(hidden=(16, 24, 12))
    x, t = points((2,), n=50)
    whole = net.output_and_trace(x, t)
    monkeypatch.setattr(mlp, "TRACE_CHUNK_ELEMENTS", 7 * 3 * 24)  # chunks of 7 rows
    chunked = net.output_and_trace(x, t)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-5, atol=1e-5)


def test_a_net_in_training_gives_the_same_trace_and_no_graph():
    net = make_net().train().requires_grad_(True)  # no dropout: training mode changes nothing
    x, t = points((2,))
    x.requires_grad_(True)
    out, tr = net.output_and_trace(x, t)
    assert not out.requires_grad and not tr.requires_grad  # as divergence(): no graph kept
    want_out, want_tr = divergence(lambda z: net(z, t), x)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    assert_trace_close(tr, want_tr, 1e-5)


def test_no_closed_form_for_dropout_in_training_or_an_unknown_activation(monkeypatch):
    net = make_net(dropout=0.2)
    x, t = points((2,))
    assert net.output_and_trace(x, t) is not None  # eval mode: dropout is off
    assert net.train().output_and_trace(x, t) is None
    monkeypatch.delitem(ACTIVATION_DERIVATIVES, "elu")
    assert make_net().output_and_trace(x, t) is None


# ---------------------------------------------------------------------- the block model
@pytest.mark.parametrize(
    ("process", "partition"),
    [("vp", equal(3)), ("ot", equal(3)), ("vp", grid(3))],
)
def test_field_divergence_equals_autograd_on_the_field(process, partition):
    time_conditioned = partition.kind != "grid"
    nets = [make_net(seed=i, time_conditioned=time_conditioned) for i in range(3)]
    model = BlockModel(make_process(process), partition, nets)
    x, _ = points((2,))
    for seg in model.segments():
        t = 0.5 * (seg.t_lo + seg.t_hi)
        f, tr = model.field_divergence(x, t, seg.block)
        want_f, want_tr = divergence(lambda z, t=t, b=seg.block: model.field(z, t, b), x)
        torch.testing.assert_close(f, want_f, rtol=1e-5, atol=1e-5)
        assert_trace_close(tr, want_tr, 1e-5)


def test_field_divergence_is_none_without_a_closed_form():
    net = make_net(time_conditioned=False)
    x, _ = points((2,))
    plain = BlockModel(make_process("vp"), equal(1), [lambda z, t: net(z, t)])
    assert plain.field_divergence(x, 0.5, 0) is None
    linear = BlockModel(make_process("vp"), grid(2), [net, net], grid_field="linear")
    assert linear.field_divergence(x, 0.5, 1) is None


def test_likelihood_uses_the_closed_form_and_matches_autograd(monkeypatch):
    nets = [make_net(seed=i, hidden=(16, 24, 12)) for i in range(2)]
    process, partition = make_process("vp"), equal(2)
    fast = BlockModel(process, partition, nets)
    slow = BlockModel(process, partition, [lambda x, t, n=n: n(x, t) for n in nets])
    x, _ = points((2,), n=32)
    solver = SolverSettings("rk4", 8)
    want = log_likelihood(slow, x, solver=solver)
    calls = []
    real = likelihood.divergence
    monkeypatch.setattr(likelihood, "divergence", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = log_likelihood(fast, x, solver=solver)
    assert not calls  # every evaluation took the closed form
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Hutchinson still goes through autograd, closed form or not
    log_likelihood(fast, x, solver=solver, trace="hutchinson", generator=torch.Generator())
    assert calls
