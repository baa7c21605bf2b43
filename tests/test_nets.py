"""The paper MLP and its time-free twin."""

from __future__ import annotations

import pytest
import torch

from psm.nets import MLPSpec, PaperMLP
from psm.runs.config import ConfigError, validate_config


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
    net = MLPSpec().build((2,), time_conditioned=False)
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == 2
    x = torch.randn(5, 2)
    torch.testing.assert_close(net(x, torch.zeros(5)), net(x, torch.ones(5)))


def test_configurable_widths_and_errors():
    net = MLPSpec(hidden=[8], activation="silu").build((3,), time_conditioned=True)
    assert net(torch.randn(2, 3), torch.rand(2)).shape == (2, 3)
    with pytest.raises(ConfigError, match=r"net\.name: unknown net 'unet9'"):
        validate_config({"net": {"name": "unet9"}})
    with pytest.raises(ConfigError, match=r"net\.activation: unknown activation 'gelu2'"):
        validate_config({"net": {"activation": "gelu2"}})


def test_mlp_flattens_points_of_any_shape():
    net = MLPSpec(hidden=[8]).build((1, 4, 4), time_conditioned=True)
    x = torch.randn(3, 1, 4, 4)
    assert net(x, torch.rand(3)).shape == (3, 1, 4, 4)
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Linear))
    assert first.in_features == 16 + 2


def test_input_scale_multiplies_the_first_layers_x_weights_only():
    torch.manual_seed(0)
    plain = MLPSpec().build((2,), time_conditioned=True)
    torch.manual_seed(0)
    scaled = MLPSpec(input_scale=30.0).build((2,), time_conditioned=True)
    w0, w1 = plain.layers[0].weight, scaled.layers[0].weight
    torch.testing.assert_close(w1[:, :2], 30.0 * w0[:, :2])
    torch.testing.assert_close(w1[:, 2:], w0[:, 2:])  # the time inputs are left alone
