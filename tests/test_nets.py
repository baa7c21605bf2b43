"""The paper MLP and its time-free twin."""

from __future__ import annotations

import pytest
import torch

from psm.nets import PaperMLP, build_net


def test_paper_mlp_architecture():
    net = PaperMLP(2)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (4, 100), (100, 150), (150, 100), (100, 2)
    ]  # fmt: skip
    assert sum(isinstance(m, torch.nn.ELU) for m in net.modules()) == 3
    x, t = torch.randn(7, 2), torch.rand(7)
    assert net(x, t).shape == (7, 2)
    # [x, t, t]: the output depends on t
    assert not torch.allclose(net(x, t), net(x, t + 0.5))


def test_time_free_twin_ignores_t():
    net = build_net("mlp", 2, time_conditioned=False)
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == 2
    x = torch.randn(5, 2)
    torch.testing.assert_close(net(x, torch.zeros(5)), net(x, torch.ones(5)))


def test_configurable_widths_and_errors():
    net = build_net("mlp", 3, time_conditioned=True, hidden=[8], activation="silu")
    assert net(torch.randn(2, 3), torch.rand(2)).shape == (2, 3)
    with pytest.raises(ValueError, match="unknown net"):
        build_net("unet9", 2, time_conditioned=True)
    with pytest.raises(ValueError, match="unknown activation"):
        build_net("mlp", 2, time_conditioned=True, activation="gelu2")
