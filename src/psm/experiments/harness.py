"""The harness every experiment runs its runs through: train a run's unfinished blocks behind a
progress bar, score it through :func:`~psm.runs.inference.evaluate_run` under the run's own
``eval`` settings, and keep the score as an ordinary NLL record in ``<run>/nll.jsonl``
(:mod:`psm.runs.nll_records`, the lines ``psm nll`` appends), which is also the cache: a run
scored once under the same settings is not scored again.

``psm reproduce`` and ``psm demo`` are both written against it; an experiment is a catalogue of
run configs plus a loop of :func:`train` and :func:`score`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..executors.monitor import ProgressMonitor
from ..runs import nll_records
from ..runs.config import RunConfig
from ..runs.inference import eval_settings, evaluate_run
from ..runs.run import Run
from ..training.train import train_block, train_ensemble

BATCH_SIZE = 5000
"""Test points per likelihood solve (the 2D MLPs score 5,000 points at once on a CPU)."""
DEVICE, DTYPE = "cpu", "float32"
"""Where and in what precision the harness scores: the numbers of the README and results."""


@dataclass(frozen=True)
class Score:
    """A run's test NLL as an experiment reports it.

    Attributes:
        nll: mean NLL in nats (NaN when not finite).
        stderr: its standard error.
        n: test points.
        solver: the ODE solver's name.
        steps: its steps (None for adaptive solvers).
        seconds: seconds the likelihood took.
        entropy: the data's true entropy (the floor at t = 0), when known.
        block_steps: the training the scored weights had, block-steps over all blocks (None
            when not recorded).
        train_seconds: the longest block's training seconds then (None when not recorded).
        record: the ``nll.jsonl`` record it came from (None for a score from elsewhere, e.g.
            an older cache).
    """

    nll: float
    stderr: float
    n: int
    solver: str
    steps: int | list[int] | None
    seconds: float
    entropy: float | None = None
    block_steps: int | None = None
    train_seconds: float | None = None
    record: dict[str, Any] | None = None

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Score:
        """The score an ``nll.jsonl`` record holds."""

        def num(x: float | None) -> float:
            return math.nan if x is None else float(x)

        return cls(
            nll=num(rec["nll"]), stderr=num(rec["stderr"]), n=int(rec["n"]),
            solver=rec["solver"], steps=rec["steps"], seconds=float(rec["seconds"]),
            entropy=rec.get("entropy"), block_steps=rec.get("trained_block_steps"),
            train_seconds=rec.get("train_seconds"), record=rec,
        )  # fmt: skip


def train(
    run: Run, blocks: list[int], *, label: str, progress: bool = True, stacked: bool = True
) -> None:
    """Train ``blocks`` of ``run`` to its step targets behind one progress bar.

    Args:
        run: the run (its config gives the targets).
        blocks: the blocks to train (those not done, usually).
        label: the bar's label.
        progress: show the bar.
        stacked: all blocks as one vectorized stack (the ensemble trainer); False trains them
            one after another, each on its own.

    Raises:
        KeyboardInterrupt: a block stopped short of its target (Ctrl-C reached the trainer, or it
            failed): nothing part-trained is scored, and the same call resumes.
    """
    if not blocks:
        return
    with ProgressMonitor(run, blocks, enabled=progress, desc=label):
        if stacked:
            outs = train_ensemble(run, blocks)
        else:
            outs = []
            for b in blocks:
                outs.append(train_block(run, b))
                if outs[-1].state not in ("done", "skipped"):
                    break
    if any(o.state not in ("done", "skipped") for o in outs) or run.ledger.not_done(
        blocks, invocation=True
    ):
        raise KeyboardInterrupt


def with_config(run: Run, config: RunConfig) -> Run:
    """The run directory seen under another config of the same problem (e.g. an earlier step
    target of an extended run), nothing written: what its scores at that config are looked up
    under."""
    if run.hash_of(config) != run.hash:
        raise ValueError(f"{run.path}: the config describes another problem")
    return Run(run.path, config, run.hash, legacy_hash=run.legacy_hash, parts=run.parts)


def evaluation_key(run: Run, *, batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """The identity (:data:`~psm.runs.nll_records.IDENTITY`) of the harness's evaluation of
    ``run`` under its ``eval`` section."""
    ev = run.config.eval
    return nll_records.evaluation_key(
        run, eval_settings(run), n=ev.n_test, test_seed=ev.test_seed, batch_size=batch_size,
        device=DEVICE, dtype=DTYPE,
    )  # fmt: skip


def cached_score(run: Run, *, batch_size: int = BATCH_SIZE, current: bool = True) -> Score | None:
    """The newest score of ``run`` in its ``nll.jsonl`` under the harness's settings, or None.

    Args:
        run: the run (its config's ``eval`` section and step target are the key).
        batch_size: points per solve the score must have used.
        current: only a score of the weights on disk now (scored after as many block-steps as
            its blocks hold); False also takes a score of earlier weights with the same step
            target (a curve's point, scored before the run was extended).
    """
    steps = nll_records.trained(run)[0] if current else None
    rec = nll_records.find_record(
        run.path, evaluation_key(run, batch_size=batch_size), trained_block_steps=steps
    )
    return None if rec is None else Score.from_record(rec)


def evaluate(run: Run, *, batch_size: int = BATCH_SIZE, progress: bool = True) -> Score:
    """Score ``run`` now under its ``eval`` section (solver, steps, tolerances, test points
    and seed) and append the record to its ``nll.jsonl``.

    Raises:
        IncompleteRunError: some block is not trained.
    """
    ev = run.config.eval
    res = evaluate_run(run, batch_size=batch_size, device=DEVICE, progress=progress)
    settings = res.settings
    assert settings is not None
    rec = nll_records.nll_record(
        run, res, solver=settings.solver, trace=settings.trace, test_seed=ev.test_seed,
        probe_seed=0, batch_size=batch_size, device=DEVICE, dtype=DTYPE,
    )  # fmt: skip
    nll_records.append_record(run.path, rec)
    return Score.from_record(rec)


def score(run: Run, *, batch_size: int = BATCH_SIZE, progress: bool = True) -> Score:
    """The run's score: cached (:func:`cached_score` of the weights on disk), else
    :func:`evaluate`."""
    return cached_score(run, batch_size=batch_size) or evaluate(
        run, batch_size=batch_size, progress=progress
    )
