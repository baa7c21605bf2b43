"""The image nets: Ho et al.'s time-conditioned U-Net and Ronneberger et al.'s time-free one."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from psm.nets.classic_unet import ClassicUNet
from psm.nets.ddpm_unet import DDPMUNet


def tiny_ddpm(**kw) -> DDPMUNet:
    opts = {"channels": 1, "base": 8, "mults": (1, 2), "res_blocks": 1, "groups": 4}
    opts["zero_init_output"] = False  # a zero output would hide every dependence
    return DDPMUNet(**{**opts, **kw})


def tiny_classic(**kw) -> ClassicUNet:
    return ClassicUNet(**{"channels": 1, "base": 4, "depth": 2, "groups": 2, **kw})


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def images(b: int = 4, c: int = 1, size: int = 8, seed: int = 0) -> Tensor:
    return torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(seed))


NETS: dict[str, Callable[[], nn.Module]] = {
    "ddpm": tiny_ddpm,
    "classic-group": tiny_classic,
    "classic-batch": lambda: tiny_classic(norm="batch"),
    "ddpm-fourier": lambda: tiny_ddpm(fourier_freqs=(4.25, 8.5)),
}


@pytest.mark.parametrize("make", [tiny_ddpm, tiny_classic], ids=["ddpm", "classic"])
@pytest.mark.parametrize("c", [1, 3])
def test_output_has_the_shape_of_x(make, c):
    torch.manual_seed(0)
    net = make(channels=c)
    x = images(3, c)
    assert net(x, torch.rand(3)).shape == x.shape
    assert net(images(2, c, size=16), torch.rand(2)).shape == (2, c, 16, 16)
    assert net(x, 0.5).shape == x.shape  # a scalar time is broadcast


def test_ddpm_unet_depends_on_t_and_classic_does_not():
    torch.manual_seed(0)
    x = images(3)
    ddpm = tiny_ddpm().eval()
    assert not torch.allclose(ddpm(x, torch.full((3,), 0.2)), ddpm(x, torch.full((3,), 0.7)))
    classic = tiny_classic().eval()
    torch.testing.assert_close(classic(x, torch.zeros(3)), classic(x, torch.ones(3)))
    torch.testing.assert_close(classic(x, torch.zeros(3)), classic(x, None))


def test_integral_time_input_is_t_fed_five_t_squared():
    torch.manual_seed(0)
    plain = tiny_ddpm(time_input="t").eval()
    integral = tiny_ddpm(time_input="integral").eval()
    integral.load_state_dict(plain.state_dict())
    x, t = images(5), torch.rand(5)
    torch.testing.assert_close(integral(x, t), plain(x, 5 * t**2))
    assert not torch.allclose(integral(x, t), plain(x, t))


def test_output_is_zero_initialised_by_default():
    net = DDPMUNet(channels=1, base=8, mults=(1, 2), groups=4)
    assert torch.count_nonzero(net(images(2), torch.rand(2))) == 0
    assert torch.count_nonzero(tiny_ddpm()(images(2), torch.rand(2))) > 0


def perturbing_sample_0_leaves_the_rest(net: nn.Module) -> None:
    x, t = images(4), torch.rand(4)
    y = x.clone()
    y[0] += torch.randn_like(y[0])
    with torch.no_grad():
        out_x, out_y = net(x, t), net(y, t)
    assert not torch.allclose(out_x[0], out_y[0])
    torch.testing.assert_close(out_x[1:], out_y[1:], rtol=0, atol=1e-6)


def train_batch_norm(net: nn.Module) -> None:
    """A few train-mode forwards, so the running statistics are not the initial 0 and 1."""
    net.train()
    with torch.no_grad():
        for i in range(3):
            net(2 + 3 * images(16, seed=10 + i), None)


@pytest.mark.parametrize("name", list(NETS))
def test_samples_are_independent_in_eval_mode(name):
    torch.manual_seed(0)
    net = NETS[name]()
    if name == "classic-batch":
        train_batch_norm(net)
    perturbing_sample_0_leaves_the_rest(net.eval())


@pytest.mark.parametrize("name", ["ddpm", "classic-group"])
def test_group_norm_samples_are_independent_in_train_mode(name):
    torch.manual_seed(0)
    perturbing_sample_0_leaves_the_rest(NETS[name]().train())


def test_batch_norm_in_eval_mode_uses_running_statistics():
    torch.manual_seed(0)
    net = tiny_classic(norm="batch")
    train_batch_norm(net)
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.num_batches_tracked == 3 and not torch.allclose(bn.running_mean, torch.zeros(4))
    x = images(6)
    with torch.no_grad():
        alone = net.eval()(x[:1], None)
        in_batch = net(x, None)[:1]
        # train mode: batch statistics, so a sample's output depends on its batch mates
        coupled = net.train()(x, None)[:1]
    torch.testing.assert_close(alone, in_batch, rtol=0, atol=1e-6)
    assert not torch.allclose(alone, coupled, atol=1e-3)


def test_only_batch_norm_is_not_stackable():
    assert DDPMUNet.stackable and tiny_ddpm().stackable
    assert ClassicUNet.stackable and tiny_classic().stackable
    assert tiny_classic(norm="batch").stackable is False
    assert ClassicUNet.stackable  # the instance attribute does not leak into the class


def stacked(nets: list[nn.Module]):
    """K copies as one vmapped function of (params, buffers, x [K, B, ...], t [K, B])."""
    params, buffers = stack_module_state(nets)
    skeleton = copy.deepcopy(nets[0]).to("meta")

    def call(p: dict, b: dict, x: Tensor, t: Tensor) -> Tensor:
        return functional_call(skeleton, (p, b), (x, t))

    return vmap(call, randomness="different"), params, buffers


@pytest.mark.parametrize("name", ["ddpm", "ddpm-fourier", "classic-group"])
def test_stacked_vmap_equals_the_loop_forward_and_backward(name):
    torch.manual_seed(0)
    k = 3
    nets = [NETS[name]().train() for _ in range(k)]
    fn, params, buffers = stacked(nets)
    x, t = torch.randn(k, 4, 1, 8, 8), torch.rand(k, 4)

    out = fn(params, buffers, x, t)
    loop = torch.stack([net(x[i], t[i]) for i, net in enumerate(nets)])
    torch.testing.assert_close(out, loop, rtol=1e-4, atol=1e-5)

    # the gradient of a summed per-net loss is each net's own gradient
    (out**2).mean(dim=(1, 2, 3, 4)).sum().backward()
    for i, net in enumerate(nets):
        (net(x[i], t[i]) ** 2).mean().backward()
        for name_, p in net.named_parameters():
            torch.testing.assert_close(params[name_].grad[i], p.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_ddpm, tiny_classic], ids=["ddpm", "classic"])
def test_stacked_dropout_draws_different_masks_per_copy(make):
    torch.manual_seed(0)
    net = make(dropout=0.5)
    x = images(2).expand(2, -1, -1, -1, -1)  # the same batch for both copies
    t = torch.full((2, 2), 0.3)
    for mode in ("train", "eval"):
        getattr(net, mode)()
        fn, params, buffers = stacked([net, copy.deepcopy(net)])  # identical weights
        out = fn(params, buffers, x, t)
        if mode == "train":
            assert not torch.allclose(out[0], out[1])
        else:
            torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize(
    ("make", "size", "message"),
    [
        (lambda: tiny_ddpm(mults=(1, 2, 2)), 6, "6x6 is not divisible by 4"),
        (lambda: tiny_classic(depth=3), 12, "12x12 is not divisible by 8"),
    ],
)
def test_image_size_must_be_divisible(make, size, message):
    with pytest.raises(ValueError, match=message):
        make()(images(1, size=size), torch.rand(1))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="groups=3 must divide every width"):
        DDPMUNet(channels=1, base=8, mults=(1, 2), groups=3)
    with pytest.raises(ValueError, match="groups=32 must divide every width"):
        ClassicUNet(channels=1, base=16, depth=2)
    with pytest.raises(ValueError, match="time_input"):
        tiny_ddpm(time_input="sigma")
    with pytest.raises(ValueError, match="attention_levels"):
        tiny_ddpm(attention_levels=(2,))
    with pytest.raises(ValueError, match="unknown activation"):
        tiny_classic(activation="gelu9")
    with pytest.raises(ValueError, match="norm must be"):
        tiny_classic(norm="layer")
    with pytest.raises(ValueError, match=r"expects x \[B, 1, H, W\]"):
        tiny_ddpm()(images(1, c=3), torch.rand(1))


def test_full_size_parameter_counts():
    with torch.device("meta"):  # no memory, no init cost
        paper = DDPMUNet(channels=3)  # base 64, mults (1, 2, 4, 8), attention at levels 1-3
        ho_cifar = DDPMUNet(
            channels=3, base=128, mults=(1, 2, 2, 2), attention_levels=(1,), dropout=0.1
        )
        classic = ClassicUNet(channels=3)  # (3, 64, 128, 256, 512, 1024, ..., 64, 3)
        digits_ddpm = DDPMUNet(
            channels=1, base=16, mults=(1, 2), res_blocks=1, attention_levels=(1,), groups=8
        )
        digits_classic = ClassicUNet(channels=1, base=16, depth=3, groups=8)
    assert n_params(paper) == 63_482_755
    assert n_params(ho_cifar) == 35_746_307  # Ho et al. report 35.7M
    assert n_params(classic) == 31_037_763
    assert n_params(digits_ddpm) == 176_849
    assert n_params(digits_classic) == 482_449
    assert paper.attention_levels == (1, 2, 3)


def test_backward_through_a_tiny_net():
    torch.manual_seed(0)
    for net in (tiny_ddpm(dropout=0.1, attention_levels=(0, 1)), tiny_classic(dropout=0.1)):
        x = images(3)
        loss = ((net(x, torch.rand(3)) - torch.randn_like(x)) ** 2).mean()
        loss.backward()
        for name, p in net.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


# ------------------------------------------------------------ Fourier-feature inputs (VDM)
def test_fourier_input_is_x_then_sin_then_cos_of_each_frequency():
    net = tiny_ddpm(fourier_freqs=(4.25, 8.5)).double()
    x = images(2).double()
    feats = net.fourier_input(x)
    assert feats.shape == (2, 5, 8, 8) and net.conv_in.in_channels == 5
    torch.testing.assert_close(feats[:, 0], x[:, 0])
    for i, f in enumerate((4.25, 8.5)):
        torch.testing.assert_close(feats[:, 1 + i], torch.sin(2 * torch.pi * f * x[:, 0]))
        torch.testing.assert_close(feats[:, 3 + i], torch.cos(2 * torch.pi * f * x[:, 0]))
    assert "fourier_freqs" in net.state_dict()  # saved with the weights, checked on load
    assert "fourier_freqs" not in tiny_ddpm().state_dict() and tiny_ddpm().conv_in.in_channels == 1


def test_a_fourier_net_without_its_x_channel_sees_x_only_modulo_the_period():
    # one cycle per grey level: with the raw-x input weights zeroed the net is exactly periodic
    # in x with period 1 / 4.25 (two levels of 17 over [-1, 1]), i.e. it sees where in its bin
    # each pixel sits; a shift by half a period changes the output
    torch.manual_seed(0)
    net = tiny_ddpm(fourier_freqs=(4.25, 8.5)).double().eval()
    with torch.no_grad():
        net.conv_in.weight[:, 0] = 0.0
    x, t = images(3).double(), torch.full((3,), 0.01, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    shift = torch.randint(-3, 4, x.shape, generator=gen).double() / 4.25
    torch.testing.assert_close(net(x + shift, t), net(x, t), rtol=1e-7, atol=1e-9)
    assert not torch.allclose(net(x + 0.5 / 4.25, t), net(x, t))


def test_bad_fourier_frequencies_are_refused():
    with pytest.raises(ValueError, match="fourier_freqs must be positive"):
        tiny_ddpm(fourier_freqs=(4.25, 0.0))
    from pydantic import ValidationError

    from psm.nets.ddpm_unet import DDPMUNetSpec

    with pytest.raises(ValidationError):
        DDPMUNetSpec(fourier_freqs=[-1.0])
