"""The time-conditioned U-Net of Ho et al. (2020), as the paper used it for SA-DPM and TPSM.

The paper (section 3.2 and appendix H) parameterises every SA-DPM and TPSM block on images
with "the time-varying U-Net architecture introduced in (Ho et al., 2020)", taken from the
PyTorch port of Wang (2020) (lucidrains/denoising-diffusion-pytorch) with 64 base channels,
and uses the ELU activation throughout. :class:`DDPMUNet` follows the layout of Ho et al.:

- a 3x3 input convolution to ``base`` channels;
- ``len(mults)`` levels of ``res_blocks`` residual blocks at ``base * mults[i]`` channels,
  each with self-attention on the levels in ``attention_levels``; a stride-2 3x3 convolution
  between levels;
- a middle of residual block, self-attention, residual block;
- the mirrored up path with ``res_blocks + 1`` residual blocks per level, each taking the
  matching down-path activation by channel concatenation; nearest-neighbour x2 + 3x3
  convolution between levels;
- GroupNorm, activation, 3x3 output convolution back to ``channels``.

A residual block is ``GroupNorm → act → conv3x3 → (+ Linear(act(temb))) → GroupNorm → act →
dropout → conv3x3`` plus a 1x1 shortcut where the width changes. Self-attention is single-head
dot-product attention over the H*W positions of one sample. The time embedding is sinusoidal
(``base`` features) followed by ``Linear → act → Linear`` to ``4 * base`` features.

Time input. The network embeds ``1000 * s``, where

- ``time_input="t"``: ``s = t`` (the DDPM convention, step index ≈ 1000 t);
- ``time_input="integral"``: ``s = 5 t²``, the integral ``∫₀ᵗ b`` of the paper's default
  ``b(t) = 10 t``, which is what the authors' scripts feed the network. The 5 is hard-wired to
  that schedule.

Where this differs from the 2020 port: the port put a ReZero-gated *linear* attention at every
level and in the middle, used Mish, ``conv → norm → act`` blocks, a time embedding of width
``base``, transposed-convolution up-sampling and no dropout. Here the block layout, attention,
embedding width, resampling and dropout follow Ho et al., with the port's widths (``base=64``,
``mults=(1, 2, 4, 8)``) and the paper's ELU as defaults. Everything is a keyword argument so
tests and small data use tiny nets.

Initialisation: PyTorch defaults everywhere, except the output convolution, which is zeroed by
default (``zero_init_output=True``, as Ho et al. do): a fresh net predicts ε = 0, so every block
of an ensemble starts at the same loss ``E‖ε‖²``. The output convolution's own gradient is not
zero, so the first optimizer step moves it, and the rest of the net trains from the next step.

Parameter counts (32x32 RGB; the count does not depend on the image size):

- ``DDPMUNet(channels=3)`` (base 64, mults (1, 2, 4, 8), 2 res blocks, attention at levels 1-3
  = 16x16, 8x8, 4x4): 63,482,755 parameters, 1.8x Ho et al.'s net below: the widths reach 512
  and the 512-wide levels carry attention. ``attention_levels=(1,)`` gives 56,906,115.
- Ho et al.'s CIFAR-10 net (base 128, mults (1, 2, 2, 2), 2 res blocks, attention at 16x16
  only, dropout 0.1), which is ``DDPMUNet(channels=3, base=128, mults=(1, 2, 2, 2),
  attention_levels=(1,), dropout=0.1)``: 35,746,307 parameters (Ho et al. report 35.7M).
- Recommended for 1x8x8 digits on a CPU: ``DDPMUNet(channels=1, base=16, mults=(1, 2),
  res_blocks=1, attention_levels=(1,), groups=8)``: 176,849 parameters.

Shapes: ``x [B, C, H, W]`` with H and W divisible by ``2 ** (len(mults) - 1)``, ``t [B]`` (or a
scalar) in [0, 1]; the output has the shape of ``x``.

References:
    Ho, Jain & Abbeel (2020), Denoising Diffusion Probabilistic Models, appendix B.
    The paper, section 3.2 and appendix H.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from torch import Tensor, nn

from .base import BlockNet, NetSpec

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "elu": nn.ELU,  # the paper's choice (appendix H)
    "silu": nn.SiLU,  # Ho et al.'s swish
    "mish": nn.Mish,  # the 2020 PyTorch port's
    "relu": nn.ReLU,
}

TIME_INPUTS = ("t", "integral")
TIME_SCALE = 1000.0  # DDPM convention: the step index, ≈ 1000 t
INTEGRAL_COEFF = 5.0  # ∫₀ᵗ 10 s ds = 5 t² for the paper's b(t) = 10 t


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r} (choose from {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


def sinusoidal_embedding(steps: Tensor, dim: int) -> Tensor:
    """The transformer position embedding of a (float) step index, as in Ho et al.

    Args:
        steps: ``[B]`` step indices (any real value; DDPM uses 0..999).
        dim: embedding width; an odd width gets a zero last column.

    Returns:
        ``[B, dim]``: ``[sin(steps * f_k), cos(steps * f_k)]`` with ``f_k = 10000^(-k/(half-1))``.
    """
    half = dim // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, device=steps.device, dtype=steps.dtype) * -scale)
    args = steps[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Ho et al.'s residual block with an additive time embedding.

    Args:
        c_in: input channels.
        c_out: output channels.
        temb_dim: width of the time embedding.
        groups: GroupNorm groups.
        activation: name in :data:`ACTIVATIONS`.
        dropout: dropout probability before the second convolution.
    """

    def __init__(
        self, c_in: int, c_out: int, temb_dim: int, *, groups: int, activation: str, dropout: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.act1 = _activation(activation)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Sequential(_activation(activation), nn.Linear(temb_dim, c_out))
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.act2 = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut: nn.Module = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        """``x [B, c_in, H, W]``, ``temb [B, temb_dim]`` → ``[B, c_out, H, W]``."""
        h = self.conv1(self.act1(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.dropout(self.act2(self.norm2(h))))
        return self.shortcut(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions of each sample, with a residual.

    Args:
        channels: channels C (also the query/key width).
        groups: GroupNorm groups.
    """

    def __init__(self, channels: int, *, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` → ``[B, C, H, W]``."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * c**-0.5, dim=-1)
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: ``[B, C, H, W]`` → ``[B, C, H/2, W/2]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution: ``[B, C, H, W]`` → ``[B, C, 2H, 2W]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """The residual blocks (and their attention layers) of one resolution on one path."""

    def __init__(self, blocks: list[ResBlock], attentions: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)


class DDPMUNet(BlockNet):
    """Time-conditioned U-Net of Ho et al. (2020), the paper's SA-DPM/TPSM image net.

    Args:
        channels: image channels C.
        base: channels of the first level (the paper: 64; Ho et al. CIFAR-10: 128).
        mults: width multiplier of each level; ``len(mults) - 1`` down-samplings.
        res_blocks: residual blocks per level on the down path (the up path has one more).
        attention_levels: indices of the levels with self-attention; None: every level but
            the first (full-resolution) one. The middle always has attention.
        dropout: dropout probability in the residual blocks (Ho et al. CIFAR-10: 0.1).
        groups: GroupNorm groups; must divide every width.
        activation: name in :data:`ACTIVATIONS` (the paper: ELU).
        time_input: ``"t"`` embeds ``1000 t``; ``"integral"`` embeds ``1000 * 5 t²``.
        zero_init_output: zero the output convolution (a fresh net predicts 0).
        fourier_freqs: frequencies ``f`` (cycles per unit of x) of extra input channels
            ``sin(2π f x), cos(2π f x)`` of every channel (Kingma et al. 2021, VDM, appendix C:
            fine-scale features of the input, for likelihood). Empty: none (Ho et al.'s net).
    """

    def __init__(
        self,
        *,
        channels: int = 3,
        base: int = 64,
        mults: Sequence[int] = (1, 2, 4, 8),
        res_blocks: int = 2,
        attention_levels: Sequence[int] | None = None,
        dropout: float = 0.0,
        groups: int = 32,
        activation: str = "elu",
        time_input: Literal["t", "integral"] = "t",
        zero_init_output: bool = True,
        fourier_freqs: Sequence[float] = (),
    ) -> None:
        super().__init__()
        mults = tuple(int(m) for m in mults)
        if not mults or min(mults) < 1 or base < 1 or channels < 1 or res_blocks < 1:
            raise ValueError("channels, base, res_blocks and every mult must be positive")
        if time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {TIME_INPUTS}, not {time_input!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {dropout}")
        widths = [base * m for m in mults]
        if any(w % groups for w in widths):
            raise ValueError(f"groups={groups} must divide every width {tuple(widths)}")
        levels = range(len(mults))
        attention = set(levels[1:] if attention_levels is None else attention_levels)
        if not attention <= set(levels):
            raise ValueError(f"attention_levels {sorted(attention)} not in 0..{len(mults) - 1}")
        _activation(activation)  # fail early on a bad name
        freqs = [float(f) for f in fourier_freqs]
        if any(not math.isfinite(f) or f <= 0 for f in freqs):
            raise ValueError(f"fourier_freqs must be positive, not {freqs}")

        self.channels = channels
        self.time_input = time_input
        self.downsamplings = len(mults) - 1
        self.attention_levels = tuple(sorted(attention))
        self.base = base
        temb_dim = 4 * base

        def block(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(
                c_in, c_out, temb_dim, groups=groups, activation=activation, dropout=dropout
            )

        self.time_mlp = nn.Sequential(
            nn.Linear(base, temb_dim), _activation(activation), nn.Linear(temb_dim, temb_dim)
        )
        if freqs:  # f, one per feature pair (saved with the weights)
            self.register_buffer("fourier_freqs", torch.tensor(freqs))
        self.fourier = len(freqs)
        self.conv_in = nn.Conv2d(channels * (1 + 2 * self.fourier), base, 3, padding=1)

        # down path: remember the width of every activation pushed for a skip connection
        skips = [base]
        width = base
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, w in enumerate(widths):
            blocks, attns = [], []
            for _ in range(res_blocks):
                blocks.append(block(width, w))
                attns.append(
                    SelfAttention(w, groups=groups) if level in attention else nn.Identity()
                )
                width = w
                skips.append(width)
            self.down.append(_Level(blocks, attns))
            if level < self.downsamplings:
                self.downsample.append(Downsample(width))
                skips.append(width)

        self.mid1 = block(width, width)
        self.mid_attention = SelfAttention(width, groups=groups)
        self.mid2 = block(width, width)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(levels):
            w = widths[level]
            blocks, attns = [], []
            for _ in range(res_blocks + 1):
                blocks.append(block(width + skips.pop(), w))
                attns.append(
                    SelfAttention(w, groups=groups) if level in attention else nn.Identity()
                )
                width = w
            self.up.append(_Level(blocks, attns))
            if level > 0:
                self.upsample.append(Upsample(width))

        self.norm_out = nn.GroupNorm(groups, width)
        self.act_out = _activation(activation)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        if zero_init_output:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def embed_time(self, t: Tensor) -> Tensor:
        """``t [B]`` in [0, 1] → time embedding ``[B, 4 * base]``."""
        s = INTEGRAL_COEFF * t.square() if self.time_input == "integral" else t
        return self.time_mlp(sinusoidal_embedding(TIME_SCALE * s, self.base))

    def fourier_input(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` → ``[B, C (1 + 2F), H, W]``: x, then ``sin(2π f x)`` for each of
        the F frequencies, then ``cos(2π f x)`` (x alone when there are none)."""
        if not self.fourier:
            return x
        w = 2 * math.pi * self.fourier_freqs.to(x.dtype)
        proj = (x[:, None] * w[None, :, None, None, None]).flatten(1, 2)  # [B, F C, H, W]
        return torch.cat([x, torch.sin(proj), torch.cos(proj)], dim=1)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """Predict ε (or a velocity) for ``x [B, C, H, W]`` at times ``t [B]`` → ``[B, C, H, W]``.

        Raises:
            ValueError: ``x`` is not ``[B, channels, H, W]`` with H, W divisible by
                ``2 ** (len(mults) - 1)``.
        """
        self._check(x)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.embed_time(t)

        h = self.conv_in(self.fourier_input(x))
        skips = [h]
        for level, stage in enumerate(self.down):
            for blk, attn in zip(stage.blocks, stage.attentions):
                h = attn(blk(h, temb))
                skips.append(h)
            if level < self.downsamplings:
                h = self.downsample[level](h)
                skips.append(h)

        h = self.mid2(self.mid_attention(self.mid1(h, temb)), temb)

        for i, stage in enumerate(self.up):
            for blk, attn in zip(stage.blocks, stage.attentions):
                h = attn(blk(torch.cat([h, skips.pop()], dim=1), temb))
            if i < self.downsamplings:
                h = self.upsample[i](h)

        return self.conv_out(self.act_out(self.norm_out(h)))

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"DDPMUNet expects x [B, {self.channels}, H, W], got {list(x.shape)}")
        factor = 2**self.downsamplings
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"image size {x.shape[2]}x{x.shape[3]} is not divisible by {factor} "
                f"(2^{self.downsamplings} for {self.downsamplings + 1} levels)"
            )


class DDPMUNetSpec(NetSpec):
    """``net: {name: ddpm_unet}``: Ho et al.'s time-conditioned U-Net (SA-DPM, TPSM on images).

    Defaults are the paper's (appendix H: 64 base channels, the port's multipliers, ELU); the
    digits configs shrink it.
    """

    name: Literal["ddpm_unet"] = "ddpm_unet"
    base: int = Field(64, ge=1)  # channels of the first level
    mults: list[int] = Field(default_factory=lambda: [1, 2, 4, 8])  # width per level
    res_blocks: int = Field(2, ge=1)  # residual blocks per level (down path)
    attention_levels: list[int] | None = None  # levels with self-attention (default: all but 0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)  # in every residual block (Ho et al.: 0.1)
    groups: int = Field(32, ge=1)  # GroupNorm groups (must divide every width)
    activation: Literal["elu", "silu"] = "elu"
    time_input: Literal["t", "integral"] = "t"  # embed 1000 t, or 1000 * 5t² (authors' scripts)
    # input channels sin/cos(2π f x) for each f (cycles per unit of x); one cycle per grey level
    # of L levels spanning [-1, 1] is f = L / 2, with data.center: false so that every pixel's
    # levels sit at the same x (VDM's fine-scale features); empty: none
    fourier_freqs: list[PositiveFloat] = Field(default_factory=list)

    def build(self, shape: tuple[int, ...], *, time_conditioned: bool) -> nn.Module:
        if len(shape) != 3:
            raise ValueError(f"takes images (C, H, W), not points of shape {shape}")
        net = DDPMUNet(
            channels=shape[0], base=self.base, mults=self.mults, res_blocks=self.res_blocks,
            attention_levels=self.attention_levels, dropout=self.dropout, groups=self.groups,
            activation=self.activation, time_input=self.time_input,
            fourier_freqs=self.fourier_freqs,
        )  # fmt: skip
        factor = 2 ** (len(self.mults) - 1)
        if shape[1] % factor or shape[2] % factor:
            raise ValueError(
                f"{len(self.mults)} levels need image sides divisible by {factor}; "
                f"the data are {shape[1]}x{shape[2]}"
            )
        return net
