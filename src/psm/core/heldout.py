"""A per-block error signal for any data: the held-out denoising bound.

The score-matching bound on the likelihood (Song et al. 2021, "Maximum likelihood training of
score-based diffusion models", thm. 1; the weighting ``λ(t) = g(t)²`` of the paper's eq. 1
loss) splits over the blocks of a partition into one term per block,

    J_b(θ) = ∫_{t_lo}^{t_hi} ½ g(t)² E_{x ~ p_t} ‖s_θ(x, t) − ∇ log p_t(x)‖² dt,

which :mod:`psm.core.block_kl` computes where ``∇ log p_t`` has a closed form (the 2D mixtures).
For any other data, replace the marginal score by the conditional one,
``∇ log p(x_t | x0) = −ε / σ_t`` for ``x_t = α_t x0 + σ_t ε`` (eq. 29), and take the
expectation over ``(x0, ε)``:

    D_b(θ) = ∫_{t_lo}^{t_hi} ½ g(t)² E_{x0, ε} ‖s_θ(x_t, t) + ε / σ_t‖² dt = J_b(θ) + C_b.

``E[−ε/σ_t | x_t] = ∇ log p_t(x_t)`` makes the cross term vanish (Vincent 2011), so
``C_b = ∫ ½ g² (E‖ε‖²/σ_t² − E‖∇ log p_t‖²) dt`` does not depend on the network: a decrease of
``D_b`` is a decrease of the block's share of the bound. (For Gaussian data ``N(μ, s² I)`` in d
dimensions, ``C_b = ∫ ½ g² d (1/σ_t² − 1/(α_t² s² + σ_t²)) dt``; ``tests/test_heldout.py``.)
The model's score comes from ``process.score`` (eq. 30: ``−ε_θ/σ_t``; a velocity is converted
first), so this works for VP ε-prediction and flow matching alike; for a flow-matching model it is
the bound of the SDE with the model's score, as in :mod:`psm.core.block_kl`.

The estimate is a fixed **held-out batch** per block: N data points ``x0``, N times stratified in
``log t`` over the block's integration segment (one per stratum, ``dt = t d log t`` as in
:func:`~psm.core.block_kl.block_kl`: the integrand varies on the scale of t near 0), and N noises,
all drawn once. With stratum width ``h = log(t_hi / t_lo) / N``,

    D̂_b = Σ_n w_n ‖s_θ(x_n, t_n) + ε_n / σ(t_n)‖²,    w_n = ½ g(t_n)² t_n h,

is an unbiased estimate of ``D_b`` (stratified sampling: ``t_n`` uniform in ``log t`` within
stratum n). Because the batch is fixed, the network-free part of its noise cancels exactly
between two measurements: the *change* of ``D̂_b`` over training is far less noisy than ``D̂_b``.

**Grid (DPSM) blocks**: the signal uses the paper's constant field (appendix H, eqs. 5-6): on the
whole cell the model's score is net i's output at its net time ``τ_i`` turned into a score at
``τ_i`` (:meth:`BlockModel._block_eval`, ``grid_field="constant"``). A model evaluated with the
``"linear"`` field mixes two nets; :func:`heldout_estimate` follows the model it is given, the
trainer always measures the constant field (one net per block).

Nothing here touches the disk or any global random state: every draw comes from the generator
the caller passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .block_kl import BlockKL
from .model import BlockModel
from .process import Process

HELDOUT_SEED = 54321
"""Seed of the held-out data points (``Dataset.test_set``); differs from ``eval.test_seed``
(12345), so synthetic 2D data give points the NLL's test set does not hold."""


@dataclass(frozen=True)
class HeldoutBatch:
    """One block's fixed held-out batch over its segment ``[t_lo, t_hi]``.

    Attributes:
        block: the block id.
        t_lo: lower end of the segment (t0 applied), > 0.
        t_hi: upper end.
        x_t: noisy points ``α_t x0 + σ_t ε``, ``[N, *D]`` (float32: what the nets take).
        t: the real times, ``[N]`` float64, one per stratum of ``log t``.
        t_net: the time the net is fed, ``[N]`` float32: ``t``, or ``τ_i`` for a grid block.
        t_eff: the time the process turns the output into a score at, ``[N]`` float64: ``t``,
            or ``τ_i`` for a grid block (the constant DPSM field).
        target: the conditional score ``−ε / σ_t``, ``[N, *D]`` float64.
        weight: quadrature weights ``½ g(t)² t h``, ``[N]`` float64 (``h``: the stratum width
            in ``log t``).
    """

    block: int
    t_lo: float
    t_hi: float
    x_t: Tensor
    t: Tensor
    t_net: Tensor
    t_eff: Tensor
    target: Tensor
    weight: Tensor

    @property
    def size(self) -> int:
        """N, the number of (point, time, noise) triples."""
        return int(self.t.shape[0])

    def to(self, device: torch.device | str) -> HeldoutBatch:
        """The same batch on ``device`` (the tensors the net and the error need)."""
        return HeldoutBatch(
            self.block, self.t_lo, self.t_hi, self.x_t.to(device), self.t.to(device),
            self.t_net.to(device), self.t_eff.to(device), self.target.to(device),
            self.weight.to(device),
        )  # fmt: skip


def heldout_batch(
    process: Process,
    t_lo: float,
    t_hi: float,
    x0: Tensor,
    generator: torch.Generator,
    *,
    block: int = 0,
    net_time: float | None = None,
) -> HeldoutBatch:
    """Draw one block's held-out batch (module docstring).

    Random numbers come from ``generator`` (a CPU generator) in this order: a permutation of the
    points (so that the file order of a test split does not pair with the times), one uniform
    per stratum of ``log t``, then ``ε ~ N(0, I) [N, *D]``.

    Args:
        process: the forward process (its schedule gives α, σ, g²).
        t_lo, t_hi: the block's integration segment, ``0 < t_lo < t_hi <= 1``
            (:meth:`Partition.segments`, t0 applied).
        x0: data points ``[N, *D]`` (N >= 2; any float dtype, on the CPU).
        generator: the batch's own random source.
        block: the block id (recorded).
        net_time: for a grid (DPSM) block, the net time ``τ_i``; None for interval blocks.

    Returns:
        The :class:`HeldoutBatch` on the CPU.
    """
    if not 0.0 < t_lo < t_hi <= 1.0:
        raise ValueError(f"a held-out segment needs 0 < t_lo < t_hi <= 1, got [{t_lo}, {t_hi}]")
    n = int(x0.shape[0])
    if n < 2:
        raise ValueError(f"a held-out batch needs at least 2 points, got {n}")
    x0 = x0.detach().to("cpu", torch.float64)[torch.randperm(n, generator=generator)]
    log_lo, log_hi = math.log(t_lo), math.log(t_hi)
    h = (log_hi - log_lo) / n
    u = torch.rand(n, generator=generator, dtype=torch.float64)  # one time in each stratum
    t = torch.exp(log_lo + (torch.arange(n, dtype=torch.float64) + u) * h).clamp(t_lo, t_hi)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    c = process.schedule(t)
    col = (n,) + (1,) * (x0.dim() - 1)
    x_t = c.alpha.reshape(col) * x0 + c.sigma.reshape(col) * noise
    target = -noise / c.sigma.reshape(col)
    weight = 0.5 * c.g2 * t * h  # ½ g² dt = ½ g² t d(log t)
    t_eff = t if net_time is None else torch.full_like(t, net_time)
    return HeldoutBatch(
        block, float(t_lo), float(t_hi), x_t.to(torch.float32), t,
        t_eff.to(torch.float32), t_eff, target, weight,
    )  # fmt: skip


def heldout_error(batch: HeldoutBatch, score: Tensor) -> tuple[float, float]:
    """The held-out term ``D̂_b`` from the model's score at the batch, and its standard error.

    Args:
        batch: the block's held-out batch.
        score: the model's score ``s_θ(x_t, t)`` at ``batch.x_t``, ``[N, *D]`` (any float dtype;
            the error is taken in float64).

    Returns:
        ``(D̂_b, s.e.)`` in nats: ``Σ_n w_n ‖s_n − target_n‖²`` and the naive standard error of
        that mean (``std(N w_n err_n) / √N``, conservative for a stratified sample). ``D̂_b``
        equals the block's KL term plus a constant that does not depend on the network.
    """
    err = (score.to(torch.float64) - batch.target).flatten(1).pow(2).sum(1)  # [N]
    v = batch.size * batch.weight * err
    return float(v.mean()), float(v.std() / math.sqrt(batch.size))


def heldout_term(process: Process, batch: HeldoutBatch, output: Tensor) -> tuple[float, float]:
    """:func:`heldout_error` from the network output of the block's net.

    Args:
        process: the forward process (turns the output into a score, eq. 30).
        batch: the block's held-out batch.
        output: the net's output at ``(batch.x_t, batch.t_net)``, ``[N, *D]`` (ε or velocity,
            as the process predicts).

    Returns:
        ``(D̂_b, s.e.)`` as :func:`heldout_error`.
    """
    x = batch.x_t.to(torch.float64)
    score = process.score(output.to(torch.float64), x, batch.t_eff.to(torch.float64))
    return heldout_error(batch, score)


def heldout_estimate(
    model: BlockModel,
    x0: Tensor,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    chunk: int = 4096,
) -> list[BlockKL]:
    """Each block's held-out denoising bound ``D̂_b`` (its KL term up to a constant).

    One batch per block (:func:`heldout_batch`, all blocks over the same points ``x0``, drawn in
    block order from ``generator``), scored with the model's own score
    (:meth:`BlockModel.score`, so a grid model's field, constant or linear, is honoured).

    Args:
        model: the block model (any process).
        x0: data points ``[N, *D]``, N >= 2 (e.g. ``dataset.test_set(N, seed=HELDOUT_SEED)``).
        generator: the random source (default: seeded 0).
        dtype: the dtype the nets are evaluated in.
        device: where the nets live.
        chunk: most points per net evaluation (memory bound).

    Returns:
        One :class:`~psm.core.block_kl.BlockKL` per block with a segment, in block order;
        ``kl`` holds ``D̂_b`` (not the KL: it is off by a network-free constant).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    out = []
    for seg in model.segments():
        if seg.t_lo <= 0:
            raise ValueError(f"block {seg.block} starts at t = {seg.t_lo}: the split needs t0 > 0")
        batch = heldout_batch(model.process, seg.t_lo, seg.t_hi, x0, gen, block=seg.block)
        parts = []
        for i in range(0, batch.size, max(1, chunk)):
            x_in = batch.x_t[i : i + chunk].to(device, dtype)
            t_in = batch.t[i : i + chunk].to(device, dtype)
            with torch.no_grad():
                parts.append(model.score(x_in, t_in, seg.block).cpu())
        value, se = heldout_error(batch, torch.cat(parts))
        out.append(BlockKL(seg.block, seg.t_lo, seg.t_hi, value, se))
    return out
