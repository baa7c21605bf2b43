"""A trained run as a model: the bridge between the run directory and the math.

:mod:`psm.model`, :mod:`psm.ode`, :mod:`psm.sample` and :mod:`psm.likelihood` know nothing of
files; this module loads a run's blocks into a :class:`~psm.model.BlockModel` (refusing missing
or unfinished blocks) and scores a run on its test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_weights
from .errors import IncompleteRunError
from .likelihood import NLLResult, TraceMethod, evaluate_nll
from .model import BlockModel, GridField
from .ode import SolverSettings
from .run import Run


def load_model(
    run: str | Path | Run,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    grid_field: GridField = "constant",
) -> BlockModel:
    """Build a run's nets from its config and load every block's final weights.

    Args:
        run: a run directory or an open :class:`~psm.run.Run`.
        device: where the nets live.
        dtype: the nets' dtype (float64 for reference integrations).
        grid_field: DPSM field, ``"constant"`` (paper) or ``"linear"``.

    Returns:
        A :class:`BlockModel` whose blocks are the nets, in eval mode with gradients off.

    Raises:
        IncompleteRunError: some blocks are missing or unfinished (named in the message); no
            block is ever replaced by an untrained network. Blocks may be done at different
            step counts (each at its own target).
        CheckpointError: a weights file is unreadable or belongs to another config.
    """
    r = run if isinstance(run, Run) else Run.open(run)
    missing = r.unfinished()
    if missing:
        states = [r.block_status(b).state for b in missing]
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
    return BlockModel(r.process, r.partition, nets, grid_field=grid_field, shape=r.shape)


@dataclass(frozen=True)
class RunEvaluation:
    """A run's test NLL beside what the data allow.

    Attributes:
        result: the NLL on the test set.
        dataset: the dataset's name.
        entropy: the data's true entropy in nats (the NLL floor), when known.
        grid_field: the DPSM field used (``None`` for interval partitions).
    """

    result: NLLResult
    dataset: str
    entropy: float | None
    grid_field: str | None


def evaluate_run(
    run: str | Path | Run,
    *,
    n: int | None = None,
    solver: SolverSettings | None = None,
    trace: TraceMethod = "exact",
    test_seed: int | None = None,
    probe_seed: int = 0,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    grid_field: GridField = "constant",
    progress: bool = True,
) -> RunEvaluation:
    """Test NLL of a trained run on its dataset's test set (``data.test_set(n, seed)``).

    Defaults come from the run's ``eval`` config section (``n_test``, ``solver``, ``steps``,
    ``test_seed``).

    Args:
        run: a run directory or an open :class:`~psm.run.Run`.
        n: test points.
        solver: the ODE solver (default: the run's ``eval.solver`` and ``eval.steps``).
        trace: ``"exact"`` or ``"hutchinson"``.
        test_seed: seed of the synthetic test set.
        probe_seed: seed of the Hutchinson probes.
        batch_size: points per solve.
        device: where to evaluate.
        dtype: evaluation dtype.
        grid_field: DPSM field, ``"constant"`` (paper) or ``"linear"``.
        progress: show a progress bar.

    Returns:
        A :class:`RunEvaluation` (NLL ± s.e., and the true-entropy floor when the data have one).

    Raises:
        IncompleteRunError: the run has missing or unfinished blocks.
        DataError: a data file changed since the run was created.
    """
    r = run if isinstance(run, Run) else Run.open(run)
    r.check_data()
    ev = r.config.eval
    solver = solver or SolverSettings(ev.solver, ev.steps)
    model = load_model(r, device=device, dtype=dtype, grid_field=grid_field)
    data = r.dataset
    x = data.test_set(n or ev.n_test, ev.test_seed if test_seed is None else test_seed)
    result = evaluate_nll(
        model, x, batch_size=batch_size, solver=solver, trace=trace, seed=probe_seed,
        device=device, dtype=dtype, progress=progress,
    )  # fmt: skip
    return RunEvaluation(result, data.name, data.entropy, grid_field if model.is_grid else None)
