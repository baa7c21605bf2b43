"""The time-free U-Net of Ronneberger et al. (2015), the paper's DPSM image net.

DPSM trains one network per grid time t_i, so the net takes no time input. The paper
(section 3.2 and appendix H) uses "the initial U-Net as introduced and implemented in the
pioneering U-Net paper (Ronneberger et al., 2015)" with channels
``(C, a, 2a, 4a, 8a, 16a, 8a, 4a, 2a, a, C)``, ``a = 64``, and the ELU activation.

:class:`ClassicUNet` with ``depth`` down-samplings (4 gives the paper's channel tuple):

- encoder level i (i = 0..depth-1): two 3x3 convolutions (padding 1, so sizes are kept), each
  followed by a norm and the activation, to ``a * 2^i`` channels; then 2x2 max-pool;
- bottleneck: the same double convolution to ``a * 2^depth`` channels, then dropout (the
  original puts dropout at the end of the contracting path);
- decoder level i (i = depth-1..0): 2x2 transposed convolution (stride 2) halving the
  channels, concatenation with the encoder level's output, double convolution to
  ``a * 2^i`` channels;
- a 1x1 output convolution to C channels.

Convolutions followed by a norm carry no bias (the norm's shift replaces it).

Norm. ``norm="group"`` (default) normalises each sample on its own. The authors used
BatchNorm (``norm="batch"``), but in train mode batch statistics couple the samples of a batch:
one sample's output depends on the others, so the per-sample Jacobian that the exact likelihood
needs is wrong and a batch's loss is not a sum of per-sample losses. With ``norm="batch"``,
evaluate the net in eval mode (running statistics; each sample is then independent of the
rest of the batch), and the net sets ``stackable = False`` so that the ensemble trainer refuses
to stack it. (Under ``torch.func.vmap`` batch norm needs its running statistics stacked with
the parameters, or the in-place update fails; psm keeps it out of the ensemble altogether.)

Parameter counts: ``ClassicUNet(channels=3)`` (a = 64, depth 4, group norm) has 31,037,763
parameters (the same with batch norm). Recommended for 1x8x8 digits on a CPU:
``ClassicUNet(channels=1, base=16, depth=3, groups=8)``: 482,449 parameters.

Shapes: ``x [B, C, H, W]`` with H and W divisible by ``2 ** depth``; ``t`` is accepted and
ignored; the output has the shape of ``x``.

References:
    Ronneberger, Fischer & Brox (2015), U-Net: Convolutional Networks for Biomedical Image
    Segmentation, MICCAI.
    The paper, section 3.2 and appendix H.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from .base import BlockNet, NetSpec

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "elu": nn.ELU,  # the paper's choice (appendix H)
    "relu": nn.ReLU,  # Ronneberger et al.'s
    "silu": nn.SiLU,
}

NORMS = ("group", "batch")


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r} (choose from {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)  # tracks running statistics, used in eval mode
    return nn.GroupNorm(groups, channels)


class DoubleConv(nn.Sequential):
    """``(conv3x3 → norm → act) x 2``: ``[B, c_in, H, W]`` → ``[B, c_out, H, W]``.

    Args:
        c_in: input channels.
        c_out: output channels.
        norm: ``"group"`` or ``"batch"``.
        groups: GroupNorm groups (unused by batch norm).
        activation: name in :data:`ACTIVATIONS`.
    """

    def __init__(self, c_in: int, c_out: int, *, norm: str, groups: int, activation: str) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            _norm(norm, c_out, groups),
            _activation(activation),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            _norm(norm, c_out, groups),
            _activation(activation),
        )


class UpLevel(nn.Module):
    """Transposed-convolution up-sampling, skip concatenation and a double convolution.

    ``x [B, 2c, H, W]``, ``skip [B, c, 2H, 2W]`` → ``[B, c, 2H, 2W]``.
    """

    def __init__(self, c: int, *, norm: str, groups: int, activation: str) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.conv = DoubleConv(2 * c, c, norm=norm, groups=groups, activation=activation)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class ClassicUNet(BlockNet):
    """Time-free U-Net of Ronneberger et al. (2015), the paper's DPSM image net.

    Args:
        channels: image channels C.
        base: channels ``a`` of the first level (the paper: 64).
        depth: number of 2x2 down-samplings (4 gives the paper's channel tuple; 8x8 images
            allow at most 3).
        norm: ``"group"`` (per-sample, default) or ``"batch"`` (the authors'; not stackable,
            evaluate in eval mode).
        groups: GroupNorm groups; must divide every width ``a * 2^i``.
        activation: name in :data:`ACTIVATIONS` (the paper: ELU).
        dropout: dropout probability at the end of the contracting path.
    """

    def __init__(
        self,
        *,
        channels: int = 3,
        base: int = 64,
        depth: int = 4,
        norm: Literal["group", "batch"] = "group",
        groups: int = 32,
        activation: str = "elu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if channels < 1 or base < 1 or depth < 0:
            raise ValueError("channels and base must be positive and depth non-negative")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {dropout}")
        widths = [base * 2**i for i in range(depth + 1)]
        if norm == "group" and any(w % groups for w in widths):
            raise ValueError(f"groups={groups} must divide every width {tuple(widths)}")
        _activation(activation)  # fail early on a bad name

        self.channels = channels
        self.depth = depth
        self.norm = norm
        self.stackable = norm != "batch"  # batch statistics couple the samples of a batch
        opts = {"norm": norm, "groups": groups, "activation": activation}

        self.encoder = nn.ModuleList()
        c_in = channels
        for w in widths[:-1]:
            self.encoder.append(DoubleConv(c_in, w, **opts))
            c_in = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(c_in, widths[-1], **opts)
        self.dropout = nn.Dropout(dropout)
        self.decoder = nn.ModuleList(UpLevel(w, **opts) for w in reversed(widths[:-1]))
        self.conv_out = nn.Conv2d(base, channels, 1)

    def forward(self, x: Tensor, t: Tensor | float | None = None) -> Tensor:
        """``x [B, C, H, W]`` → ``[B, C, H, W]``; ``t`` is ignored (one net per grid time).

        Raises:
            ValueError: ``x`` is not ``[B, channels, H, W]`` with H, W divisible by
                ``2 ** depth``.
        """
        del t
        self._check(x)
        skips = []
        h = x
        for level in self.encoder:
            h = level(h)
            skips.append(h)
            h = self.pool(h)
        h = self.dropout(self.bottleneck(h))
        for level in self.decoder:
            h = level(h, skips.pop())
        return self.conv_out(h)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"ClassicUNet expects x [B, {self.channels}, H, W], got {list(x.shape)}"
            )
        factor = 2**self.depth
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"image size {x.shape[2]}x{x.shape[3]} is not divisible by {factor} "
                f"(2^depth, depth={self.depth})"
            )


class ClassicUNetSpec(NetSpec):
    """``net: {name: classic_unet}``: Ronneberger et al.'s time-free U-Net (DPSM on images).

    Channels ``(C, a, 2a, 4a, 8a, 16a, 8a, 4a, 2a, a, C)`` with ``a = base`` at ``depth = 4``
    (appendix H). ``norm: group`` (default) keeps samples independent, as the exact likelihood
    needs; ``norm: batch`` is the authors' choice, evaluated with running statistics and never
    stacked.
    """

    name: Literal["classic_unet"] = "classic_unet"
    base: int = Field(64, ge=1)  # a: channels of the first level
    depth: int = Field(4, ge=0)  # down-samplings (4: the paper's channel tuple)
    norm: Literal["group", "batch"] = "group"
    groups: int = Field(32, ge=1)  # GroupNorm groups (must divide every width)
    activation: Literal["elu", "silu", "relu"] = "elu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)

    def build(self, shape: tuple[int, ...], *, time_conditioned: bool) -> nn.Module:
        if len(shape) != 3:
            raise ValueError(f"takes images (C, H, W), not points of shape {shape}")
        factor = 2**self.depth
        if shape[1] % factor or shape[2] % factor:
            raise ValueError(
                f"depth {self.depth} needs image sides divisible by {factor}; "
                f"the data are {shape[1]}x{shape[2]}"
            )
        return ClassicUNet(
            channels=shape[0], base=self.base, depth=self.depth, norm=self.norm,
            groups=self.groups, activation=self.activation, dropout=self.dropout,
        )  # fmt: skip
