"""A trained run as a model: the bridge between the run directory and the math.

:mod:`psm.core.model`, :mod:`psm.core.ode`, :mod:`psm.core.sample` and
:mod:`psm.core.likelihood` know nothing of files; this module loads a run's blocks into a
:class:`~psm.core.model.BlockModel` (refusing missing or unfinished blocks) and scores a run on
its test set: the NLL in nats, and for image data bits/dim in one of two conventions
(:data:`CONVENTIONS`):

* ``"psm"`` (the headline): test images dequantized, ``x = (k + u) / L``, mapped to the model's
  ``y = s (x - m)`` exactly as in training; ``bpd = (NLL - D log s) / (D ln 2) + log2 L``
  (:meth:`~psm.data.images.ImageDataset.bits_per_dim`), an upper bound on the discrete
  negative log-likelihood of the levels ``k``. Likelihood from the run's ``t0``, with the
  run's ``eval`` solver, Hutchinson probes held fixed through each solve.
* ``"authors"``: what the authors' scripts compute, ``log2 L - log p / (D ln 2)`` (8 - ... for
  256 levels) on ``k / (L - 1)`` minus the training mean (no dequantization, so not a bound),
  starting the likelihood at ``t0 = 0.001`` (:data:`AUTHORS_T0`), with ``1000 // K`` RK4 steps
  per block and a Hutchinson probe redrawn at every function evaluation. The same
  log-Jacobian of psm's scale is added back, so the number is the authors' for their own data
  map whatever ``data.scale`` the run used.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..core.likelihood import (
    NLLResult,
    ProbeRedraw,
    TraceMethod,
    auto_trace,
    evaluate_nll,
)
from ..core.model import BlockModel, GridField
from ..core.ode import SolverSettings
from ..core.partition import Partition, PartitionError
from ..data.base import Dataset, Quantized
from ..errors import IncompleteRunError, PSMError
from ..progress import progress_bar
from .checkpoint import load_weights
from .run import Run

Convention = Literal["psm", "authors"]
CONVENTIONS: tuple[str, ...] = ("psm", "authors")
AUTHORS_T0 = 1e-3
"""Where the authors' scripts start the likelihood integral."""
AUTHORS_STEPS = 1000
"""The authors' scripts take ``AUTHORS_STEPS // K`` RK4 steps in each of K blocks."""


def load_model(
    run: str | Path | Run,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    grid_field: GridField = "constant",
    t0: float | None = None,
) -> BlockModel:
    """Build a run's nets from its config and load every block's final weights.

    Args:
        run: a run directory or an open :class:`~psm.runs.run.Run`.
        device: where the nets live.
        dtype: the nets' dtype (float64 for reference integrations).
        grid_field: DPSM field, ``"constant"`` (paper) or ``"linear"``.
        t0: integrate from this time instead of the run's ``partition.t0``
            (:func:`with_t0`).

    Returns:
        A :class:`BlockModel` whose blocks are the nets, in eval mode with gradients off.

    Raises:
        IncompleteRunError: some blocks are missing or unfinished (named in the message); no
            block is ever replaced by an untrained network. Blocks may be done at different
            step counts (each at its own target).
        CheckpointError: a weights file is unreadable or belongs to another config.
    """
    r = run if isinstance(run, Run) else Run.open(run)
    missing = r.ledger.not_done()
    if missing:
        states = [r.ledger.status(b).state for b in missing]
        listed = ", ".join(f"{b} ({s})" for b, s in zip(missing[:20], states[:20]))
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise IncompleteRunError(
            f"run {r.path} is not fully trained: {len(missing)} of {r.num_blocks} block(s) "
            f"not done: {listed}{more}; train them first (psm train with this run's config)"
        )
    nets = []
    for b in range(r.num_blocks):
        net = r.parts.new_net()
        load_weights(r, b, net)
        net = net.to(device=device, dtype=dtype).eval()
        net.requires_grad_(False)
        nets.append(net)
    model = BlockModel(r.process, r.partition, nets, grid_field=grid_field, shape=r.shape)
    return model if t0 is None else with_t0(model, t0)


def with_t0(model: BlockModel, t0: float) -> BlockModel:
    """The same blocks integrated from another time floor ``t0``.

    Raises:
        PSMError: the partition cannot take that floor (e.g. block 0 would lie below it).
    """
    if t0 == model.t0:
        return model
    try:
        partition = dataclasses.replace(model.partition, t0=t0)
    except PartitionError as e:
        raise PSMError(f"t0 {t0:g}: {e}") from None
    return BlockModel(
        model.process, partition, model.blocks, grid_field=model.grid_field, shape=model.shape
    )


@dataclass(frozen=True)
class BitsPerDim:
    """A bits/dim figure of image data, with what it means.

    Attributes:
        bpd: mean bits/dim over the test images.
        stderr: its standard error (``stderr`` of the NLL over ``D ln 2``).
        trivial: ``log2 L``, the bits/dim of the uniform distribution over the levels (any
            model worth keeping is below it).
        levels: L.
        dims: D = C H W.
        log_scale_per_dim: the data map's log-Jacobian per dimension (``log s``), added back.
        convention: ``"psm"`` (dequantized) or ``"authors"``.
        values: per-image bits/dim ``[n]`` (float64, CPU).
    """

    bpd: float
    stderr: float
    trivial: float
    levels: int
    dims: int
    log_scale_per_dim: float
    convention: str
    values: Tensor = dataclasses.field(repr=False)


def is_image_data(dataset: Dataset) -> bool:
    """Whether a dataset has discrete levels and a bits/dim formula (image data): a
    :class:`~psm.data.base.Quantized`."""
    return isinstance(dataset, Quantized)


def bits_per_dim(
    result: NLLResult, dataset: Quantized, convention: Convention = "psm"
) -> BitsPerDim:
    """Bits/dim of an NLL result through the dataset's own formula
    (:meth:`~psm.data.images.ImageDataset.bits_per_dim`), per image, then averaged."""
    values = dataset.bits_per_dim(result.values)
    dims = math.prod(dataset.shape)
    n = values.numel()
    se = float(values.std() / math.sqrt(n)) if n > 1 else float("nan")
    return BitsPerDim(
        bpd=float(values.mean()), stderr=se, trivial=math.log2(dataset.levels),
        levels=int(dataset.levels), dims=dims, log_scale_per_dim=dataset.log_scale_per_dim,
        convention=convention, values=values,
    )  # fmt: skip


def authors_solver(partition: Partition, fallback: SolverSettings) -> SolverSettings:
    """The authors' likelihood solver: RK4 with ``1000 // K`` steps in each of K interval blocks
    (at least one). DPSM grids keep ``fallback`` (the run's eval solver: appendix H's Euler)."""
    if partition.kind == "grid":
        return fallback
    k = partition.num_blocks
    return SolverSettings("rk4", (max(1, AUTHORS_STEPS // k),) * k)


@dataclass(frozen=True)
class EvalSettings:
    """How a run is scored, every choice resolved (what a record needs to be reproduced).

    Attributes:
        convention: ``"psm"`` or ``"authors"`` (image data), None for data without levels.
        solver: the ODE solver.
        trace: ``"exact"`` or ``"hutchinson"``.
        probes: Hutchinson probes per solve / evaluation.
        redraw: ``"solve"`` or ``"evaluation"``.
        t0: where the likelihood integral starts.
        dequantize: whether the test images are dequantized (None for data without levels).
    """

    convention: str | None
    solver: SolverSettings
    trace: TraceMethod
    probes: int
    redraw: ProbeRedraw
    t0: float
    dequantize: bool | None


def eval_settings(
    run: Run,
    *,
    convention: Convention = "psm",
    solver: SolverSettings | None = None,
    trace: TraceMethod | Literal["auto"] | None = None,
    probes: int = 1,
    redraw: ProbeRedraw | None = None,
) -> EvalSettings:
    """Resolve a run's evaluation settings: given values win, then the convention's, then the
    run's ``eval`` section; ``trace`` ``None``/``"auto"`` is exact up to
    :data:`~psm.core.likelihood.EXACT_TRACE_MAX_DIM` dimensions, Hutchinson above.

    Raises:
        PSMError: ``convention="authors"`` for data without levels, or an unknown convention.
    """
    if convention not in CONVENTIONS:
        raise PSMError(f"unknown convention {convention!r} (choose from psm, authors)")
    if probes < 1:
        raise PSMError(f"probes must be >= 1, got {probes}")
    own = run.config.eval.solver_settings()
    image = is_image_data(run.dataset)
    dims = math.prod(run.shape)
    if convention == "authors":
        if not image:
            raise PSMError(
                f"the authors' convention is for image data; {run.config.data.name} has none "
                "(its NLL is in nats)"
            )
        return EvalSettings(
            convention="authors",
            solver=solver or authors_solver(run.partition, own),
            trace="hutchinson" if trace in (None, "auto") else trace,
            probes=probes,
            redraw=redraw or "evaluation",
            t0=AUTHORS_T0,
            dequantize=False,
        )
    return EvalSettings(
        convention="psm" if image else None,
        solver=solver or own,
        trace=auto_trace(dims) if trace in (None, "auto") else trace,
        probes=probes,
        redraw=redraw or "solve",
        t0=run.partition.t0,
        dequantize=True if image else None,
    )


@dataclass(frozen=True)
class RunEvaluation:
    """A run's test NLL beside what the data allow.

    Attributes:
        result: the NLL on the test set (nats per point).
        dataset: the dataset's name.
        entropy: the data's true entropy in nats (the NLL floor), when known.
        grid_field: the DPSM field used (``None`` for interval partitions).
        bits: bits/dim for image data (None otherwise).
        settings: the resolved settings (None when scored by :func:`evaluate_model` without
            them).
    """

    result: NLLResult
    dataset: str
    entropy: float | None
    grid_field: str | None
    bits: BitsPerDim | None = None
    settings: EvalSettings | None = None


def evaluate_model(
    model: BlockModel,
    dataset: Dataset,
    *,
    n: int,
    test_seed: int,
    settings: EvalSettings,
    probe_seed: int = 0,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prior_log_prob=None,
    progress: bool = True,
) -> RunEvaluation:
    """Score a model on a dataset's test set under resolved settings (no disk involved).

    The model is moved to ``settings.t0`` (:func:`with_t0`); image test sets are drawn in the
    settings' convention (dequantized or not) and the result carries bits/dim.

    Args:
        model: the assembled blocks.
        dataset: the run's dataset; a :class:`~psm.data.base.Quantized` one (images) also
            gets bits/dim.
        n: test points.
        test_seed: seed of the test set (its dequantization noise, for images).
        settings: from :func:`eval_settings` (or built by hand).
        probe_seed: seed of the Hutchinson probes.
        batch_size: points per solve.
        device: where to evaluate.
        dtype: evaluation dtype.
        prior_log_prob: log-density at t = 1 (default ``N(0, I)``; tests pass the exact one).
        progress: show a progress bar (``NLL``, one step per solver step).
    """
    model = with_t0(model, settings.t0)
    image = is_image_data(dataset)
    x = dataset.test_set(n, test_seed, dequantize=settings.dequantize)
    with progress_bar("NLL", enabled=progress) as bar:
        result = evaluate_nll(
            model, x, batch_size=batch_size, solver=settings.solver, trace=settings.trace,
            probes=settings.probes, redraw=settings.redraw, seed=probe_seed, device=device,
            dtype=dtype, prior_log_prob=prior_log_prob, progress=bar,
        )  # fmt: skip
    bits = bits_per_dim(result, dataset, settings.convention or "psm") if image else None
    return RunEvaluation(
        result, dataset.name, dataset.entropy,
        model.grid_field if model.is_grid else None, bits, settings,
    )  # fmt: skip


def evaluate_run(
    run: str | Path | Run,
    *,
    n: int | None = None,
    solver: SolverSettings | None = None,
    trace: TraceMethod | Literal["auto"] | None = None,
    probes: int = 1,
    redraw: ProbeRedraw | None = None,
    convention: Convention = "psm",
    test_seed: int | None = None,
    probe_seed: int = 0,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    grid_field: GridField = "constant",
    progress: bool = True,
) -> RunEvaluation:
    """Test NLL of a trained run on its dataset's test set (``data.test_set(n, seed)``), and
    bits/dim for image data.

    Defaults come from the run's ``eval`` config section (``n_test``, ``test_seed`` and the
    solver, :meth:`~psm.runs.config.EvalConfig.solver_settings`) and, for images, from the
    convention (module docstring).

    Args:
        run: a run directory or an open :class:`~psm.runs.run.Run`.
        n: test points.
        solver: the ODE solver (default: the convention's, else the run's
            ``eval.solver_settings()``).
        trace: ``"exact"``, ``"hutchinson"``, or ``"auto"``/None (exact up to 16 dimensions).
        probes: Hutchinson probes averaged per solve (or per evaluation).
        redraw: when probes are drawn, ``"solve"`` or ``"evaluation"`` (default: the
            convention's).
        convention: ``"psm"`` (dequantized bits/dim) or ``"authors"`` (image runs only).
        test_seed: seed of the test set.
        probe_seed: seed of the Hutchinson probes.
        batch_size: points per solve.
        device: where to evaluate.
        dtype: evaluation dtype.
        grid_field: DPSM field, ``"constant"`` (paper) or ``"linear"``.
        progress: show a progress bar.

    Returns:
        A :class:`RunEvaluation` (NLL ± s.e., the true-entropy floor when the data have one,
        bits/dim ± s.e. for images, and the resolved settings).

    Raises:
        IncompleteRunError: the run has missing or unfinished blocks.
        DataError: a data file changed since the run was created.
        PSMError: the authors' convention on data without levels.
    """
    r = run if isinstance(run, Run) else Run.open(run)
    r.check_data()
    ev = r.config.eval
    settings = eval_settings(
        r, convention=convention, solver=solver, trace=trace, probes=probes, redraw=redraw
    )
    model = load_model(r, device=device, dtype=dtype, grid_field=grid_field, t0=settings.t0)
    return evaluate_model(
        model, r.dataset, n=n or ev.n_test, test_seed=ev.test_seed if test_seed is None else
        test_seed, settings=settings, probe_seed=probe_seed, batch_size=batch_size,
        device=device, dtype=dtype, progress=progress,
    )  # fmt: skip
