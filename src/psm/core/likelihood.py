"""Exact log-likelihood through the blocks (paper eqs. 4 and 6; eq. 20 for CNFs).

The instantaneous change of variables along the probability-flow ODE (eq. 30) gives

    log p₀(x) = log N(x(1); 0, I) + ∫_{t0}^{1} tr ∂f/∂x (x(t), t) dt,

integrated from the data point ``x(t0) = x`` to noise, block by block: the integral is the sum
over blocks of eq. 4 (TPSM) or, for DPSM with the piecewise-constant field and one Euler step per
cell, exactly eq. 6. The solver carries the augmented state ``(x, Δ)`` with ``dΔ/dt = tr ∂f/∂x``.

The trace is exact or Hutchinson's. The exact trace comes from the block itself where it
offers a closed form (:meth:`BlockModel.field_divergence`; the paper MLP's
:meth:`~psm.nets.mlp.PaperMLP.output_and_trace`: one forward-mode tangent per dimension, no
autograd graph), else from autograd (:func:`divergence`: one reverse-mode product per
dimension); both give the same trace to float rounding. Hutchinson's estimate is
``v^T (∂f/∂x) v`` with Rademacher probes ``v``: by default ``probes`` of them drawn once per
batch and held fixed through the whole solve (as score_sde does; the estimate of ``log p`` is
then unbiased and the ODE stays smooth), or, the authors' scripts' way, redrawn at every function
evaluation (``redraw="evaluation"``). Above :data:`EXACT_TRACE_MAX_DIM` dimensions the exact
trace costs D products per evaluation (about 50x Hutchinson on 8x8 digits), so callers choose
Hutchinson there (:func:`auto_trace`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .model import BlockModel
from .ode import PAPER_SOLVER, SolverSettings, State, integrate_blocks, solve_units
from .progress import Progress, check_progress

TraceMethod = Literal["exact", "hutchinson"]
TRACE_METHODS: tuple[str, ...] = ("exact", "hutchinson")
EXACT_LOOP_MAX_DIM = 8  # exact trace by d separate products up to this dimension
EXACT_TRACE_MAX_DIM = 16
"""The exact trace is the default up to this many dimensions, Hutchinson above (images)."""

ProbeRedraw = Literal["solve", "evaluation"]
PROBE_REDRAWS: tuple[str, ...] = ("solve", "evaluation")
"""When Hutchinson probes are drawn: once per solve (held fixed) or at every evaluation."""


def auto_trace(dim: int) -> TraceMethod:
    """The default trace for points of ``dim`` dimensions: exact up to
    :data:`EXACT_TRACE_MAX_DIM`, Hutchinson above."""
    return "exact" if dim <= EXACT_TRACE_MAX_DIM else "hutchinson"


# ---------------------------------------------------------------------- traces
def divergence(
    f: Callable[[Tensor], Tensor], x: Tensor, probe: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``f(x)`` and the trace of its Jacobian per sample.

    ``f`` must act on each sample independently (its Jacobian is block-diagonal over the batch),
    as every block net in eval mode does. Works inside :func:`torch.no_grad`; nothing is kept
    for a backward pass through the result.

    Args:
        f: ``[B, *D] -> [B, *D]``.
        x: ``[B, *D]``.
        probe: None for the exact trace: D reverse-mode products ``e_k^T ∂f/∂x``, batched in one
            call (``is_grads_batched``), never a loop over samples; or a ``[B, *D]`` probe ``v``
            for Hutchinson's unbiased estimate ``v^T (∂f/∂x) v`` (one product); or ``[P, B, *D]``
            probes, whose P estimates are averaged (P products, one forward pass).

    Returns:
        ``(f(x) [B, *D], tr ∂f/∂x [B])``.
    """
    b, d = x.shape[0], x[0].numel()
    with torch.enable_grad():
        z = x.detach().requires_grad_(True)
        fz = f(z)
        if not fz.requires_grad:  # f does not depend on x
            return fz, torch.zeros(b, dtype=x.dtype, device=x.device)
        if probe is not None:
            probes = probe if probe.dim() == x.dim() + 1 else probe.unsqueeze(0)
            tr = fz.new_zeros(b)
            for i, v in enumerate(probes):
                (vj,) = torch.autograd.grad(
                    fz, z, v, retain_graph=i < len(probes) - 1, allow_unused=True
                )
                if vj is not None:
                    tr = tr + (vj * v).flatten(1).sum(1)
            return fz.detach(), tr / len(probes)
        if d <= EXACT_LOOP_MAX_DIM:
            # low dimension: d reverse-mode products, one per coordinate, each over the whole
            # batch (faster than one batched call here; measured in psm bench nll)
            flat = fz.flatten(1)
            tr = fz.new_zeros(b)
            for k in range(d):
                (g,) = torch.autograd.grad(
                    flat[:, k].sum(), z, retain_graph=k < d - 1, allow_unused=True
                )
                if g is not None:
                    tr = tr + g.flatten(1)[:, k]
            return fz.detach(), tr
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        basis = eye.reshape(d, 1, *x.shape[1:]).expand(d, b, *x.shape[1:])
        (rows,) = torch.autograd.grad(fz, z, basis, is_grads_batched=True, allow_unused=True)
    if rows is None:
        return fz.detach(), fz.new_zeros(b)
    # rows[k, n] = e_k^T J_n; the trace is the sum of the diagonal entries (k, n, k)
    return fz.detach(), torch.einsum("kbk->b", rows.reshape(d, b, d))


def rademacher(
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Tensor:
    """A tensor of independent ±1 entries (Hutchinson probe), drawn on the generator's device.

    Args:
        shape: the probe's shape, ``[B, *D]``.
        generator: the random source (its device is used for the draw).
        dtype: result dtype.
        device: result device.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    bits = torch.randint(0, 2, tuple(shape), generator=generator, device=gen_device)
    return (2 * bits - 1).to(dtype=dtype, device=device)


# ---------------------------------------------------------------------- one batch
def exact_dynamics(model: BlockModel) -> Callable[[int, Tensor, State], State]:
    """The augmented probability-flow dynamics ``(x, Δ) -> (f(x, t), tr ∂f/∂x)`` of block
    ``block`` with the exact trace (eq. 20): the block's closed form where it has one
    (:meth:`BlockModel.field_divergence`), else autograd (:func:`divergence`)."""

    def dynamics(block: int, t: Tensor, y: State) -> State:
        fast = model.field_divergence(y[0], t, block)
        if fast is not None:
            return fast
        return divergence(lambda z: model.field(z, t, block), y[0], None)

    return dynamics


def log_likelihood(
    model: BlockModel,
    x: Tensor,
    *,
    solver: SolverSettings = PAPER_SOLVER,
    trace: TraceMethod = "exact",
    probe: Tensor | None = None,
    probes: int = 1,
    redraw: ProbeRedraw = "solve",
    generator: torch.Generator | None = None,
    prior_log_prob: Callable[[Tensor], Tensor] | None = None,
    on_step: Callable[[float, State], None] | None = None,
) -> Tensor:
    """``log p(x)`` in nats per point under the model (eqs. 4 and 6).

    Args:
        model: the assembled blocks.
        x: data points ``[B, *D]`` (read as the state at ``t0``).
        solver: the ODE solver and its steps (the paper: RK4 with 1000 steps over ``[t0, 1]``).
        trace: ``"exact"`` or ``"hutchinson"``.
        probe: Hutchinson probe ``[B, *D]`` (or ``[P, B, *D]``, averaged), held fixed through
            the whole solve; drawn from ``generator`` (Rademacher) if None.
        probes: Hutchinson probes drawn per solve (or per evaluation), averaged.
        redraw: ``"solve"``: the probes are drawn once and held fixed through the solve (psm's
            default, as score_sde); ``"evaluation"``: fresh probes at every function
            evaluation (the authors' scripts; still unbiased, but the ODE's right-hand side is
            then random, so only fixed-step solvers are accepted).
        generator: random source of the probes.
        prior_log_prob: log-density at t = 1, ``[B, *D] -> [B]``; default ``log N(0, I)``
            (:meth:`Process.prior_log_prob`).
        on_step: hook after each solver step (progress).

    Returns:
        ``[B]`` log-likelihoods.
    """
    if trace not in TRACE_METHODS:
        raise ValueError(f"unknown trace {trace!r} (choose from exact, hutchinson)")
    if redraw not in PROBE_REDRAWS:
        raise ValueError(f"unknown redraw {redraw!r} (choose from solve, evaluation)")
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    per_eval = trace == "hutchinson" and redraw == "evaluation" and probe is None
    if per_eval and not solver.fixed_step:
        raise ValueError(
            f"probes redrawn at every evaluation make the ODE random: use a fixed-step solver, "
            f"not {solver.method}"
        )
    shape = (probes, *x.shape) if probes > 1 else tuple(x.shape)

    def draw() -> Tensor:
        return rademacher(shape, generator=generator, dtype=x.dtype, device=x.device)

    if trace == "hutchinson" and probe is None and not per_eval:
        probe = draw()
    v = probe if trace == "hutchinson" else None

    exact = exact_dynamics(model)

    def dynamics(block: int, t: Tensor, y: State) -> State:
        # augmented state (x, Δ): dx/dt = f(x, t), dΔ/dt = tr ∂f/∂x (eq. 20)
        if trace == "exact":
            return exact(block, t, y)
        fx, div = divergence(lambda z: model.field(z, t, block), y[0], draw() if per_eval else v)
        return fx, div

    with torch.no_grad():
        delta0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        x1, delta = integrate_blocks(
            dynamics, (x, delta0), model.segments(), direction="to_noise", solver=solver,
            on_step=on_step,
        )  # fmt: skip
        prior = prior_log_prob or model.process.prior_log_prob
        return prior(x1) + delta


# ---------------------------------------------------------------------- many points
@dataclass(frozen=True)
class NLLResult:
    """Negative log-likelihood of a set of points.

    Attributes:
        nll: mean NLL in nats.
        stderr: its standard error (sample std / √n).
        n: number of points.
        seconds: wall time of the evaluation.
        solver: the ODE solver settings.
        trace: ``"exact"`` or ``"hutchinson"``.
        values: per-point NLL ``[n]`` (float64, CPU).
        probes: Hutchinson probes per solve or evaluation (1 for the exact trace).
        redraw: when the probes were drawn (``"solve"`` or ``"evaluation"``; None for exact).
    """

    nll: float
    stderr: float
    n: int
    seconds: float
    solver: SolverSettings
    trace: str
    values: Tensor = field(repr=False)
    probes: int = 1
    redraw: str | None = None

    @property
    def finite(self) -> bool:
        """Whether every per-point NLL is finite."""
        return bool(torch.isfinite(self.values).all())


def evaluate_nll(
    model: BlockModel,
    data: Tensor,
    *,
    batch_size: int = 1000,
    solver: SolverSettings = PAPER_SOLVER,
    trace: TraceMethod = "exact",
    probes: int = 1,
    redraw: ProbeRedraw = "solve",
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    prior_log_prob: Callable[[Tensor], Tensor] | None = None,
    progress: Progress | None = None,
) -> NLLResult:
    """Mean NLL (nats) of ``data`` under the model, in batches, with its standard error.

    Args:
        model: the assembled blocks.
        data: points ``[N, *D]``.
        batch_size: points per solve.
        solver, trace, probes, redraw, prior_log_prob: as in :func:`log_likelihood`.
        seed: seed of the Hutchinson probes (one generator for the whole evaluation; probes
            drawn per batch, or per evaluation with ``redraw="evaluation"``).
        device: where to evaluate (default: the data's device).
        dtype: evaluation dtype (default: the data's).
        progress: told the total number of solver steps, each batch, and every step (every
            block for adaptive solvers), so a bar over it never looks stuck (see
            :mod:`psm.core.progress`); None: no report.

    Returns:
        An :class:`NLLResult`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = data.shape[0]
    if n < 1:
        raise ValueError("no points to evaluate")
    device = torch.device(device) if device is not None else data.device
    dtype = dtype or data.dtype
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    parts = []
    batches = math.ceil(n / batch_size)
    units = solve_units(model.segments(), solver)
    progress = check_progress(progress)
    tick = None if progress is None else (lambda t, y: progress.advance(1))
    if progress is not None:
        progress.start(batches * units)
    for j, i in enumerate(range(0, n, batch_size)):
        if progress is not None:
            progress.note(f"batch {j + 1}/{batches}")
        xb = data[i : i + batch_size].to(device=device, dtype=dtype)
        lp = log_likelihood(
            model, xb, solver=solver, trace=trace, probes=probes, redraw=redraw,
            generator=gen, prior_log_prob=prior_log_prob, on_step=tick,
        )  # fmt: skip
        parts.append(-lp.detach().to("cpu", torch.float64))
    values = torch.cat(parts)
    se = float(values.std() / math.sqrt(n)) if n > 1 else float("nan")
    hutch = trace == "hutchinson"
    return NLLResult(
        nll=float(values.mean()), stderr=se, n=n, seconds=time.perf_counter() - start,
        solver=solver, trace=trace, values=values, probes=probes if hutch else 1,
        redraw=redraw if hutch else None,
    )  # fmt: skip
