"""Read-only: the score cache ``psm reproduce`` kept before its scores went to each run's
``nll.jsonl``, so that a folder scored then still reports and plans without scoring again.

That cache was one JSON file per evaluation under ``<out>/evals/``: ``<run>.json`` for a table
cell, ``curve_<data>_<method>_<steps>.json`` for a curve point, each
``{"key": {"n", "steps", "seed", "hash"}, "nll", "stderr", "n", "steps", "seconds"}`` (a curve
point also ``"curve": {"block_steps", "train_seconds"}``), always RK4 with the exact trace on
5,000 points per solve, on the CPU in float32. Nothing here writes; :func:`lookup` finds a
score wherever a reproduce folder holds it, the run's ``nll.jsonl`` first.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..runs.run import Run
from .harness import Score, cached_score

EVALS = "evals"
"""The old cache's folder in a reproduce folder."""


def cell_path(out: Path, run_name: str) -> Path:
    """Where the old cache kept a table cell's score."""
    return out / EVALS / f"{run_name}.json"


def curve_path(out: Path, data: str, method: str, steps: int) -> Path:
    """Where the old cache kept a curve point's score."""
    return out / EVALS / f"curve_{data}_{method}_{steps}.json"


def read_score(path: Path, run: Run, *, curve: bool = False) -> Score | None:
    """The score an old cache file holds for ``run`` under its config's ``eval`` section, or
    None: no file, a file of other settings (test points, steps, seed, problem) or a solver
    other than RK4 (the only one the old cache used), or a curve point without its compute.

    Args:
        path: the file (:func:`cell_path`, :func:`curve_path`).
        run: the run, under the config the score must match.
        curve: a curve point (its training compute is part of the score).
    """
    try:
        rec = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    ev = run.config.eval
    key = {"n": ev.n_test, "steps": ev.steps, "seed": ev.test_seed, "hash": run.hash}
    if not isinstance(rec, dict) or rec.get("key") != key or ev.solver != "rk4":
        return None
    compute = rec.get("curve")
    if curve and not compute:
        return None
    compute = compute or {}
    return Score(
        nll=float(rec["nll"]), stderr=float(rec["stderr"]), n=int(rec["n"]), solver="rk4",
        steps=int(rec["steps"]), seconds=float(rec["seconds"]),
        block_steps=compute.get("block_steps"), train_seconds=compute.get("train_seconds"),
    )  # fmt: skip


def lookup(run: Run, old: Path, *, curve: bool = False) -> Score | None:
    """A score of ``run`` (under its config) as a reproduce folder holds it: the newest in the
    run's ``nll.jsonl`` (:func:`~psm.experiments.harness.cached_score`; a table cell's of the
    weights on disk, a curve point's at its step target), else the old cache's file ``old``.
    """
    return cached_score(run, current=not curve) or read_score(old, run, curve=curve)


def has_cache(out: Path) -> bool:
    """Whether ``out`` holds the old cache's folder."""
    return (out / EVALS).is_dir()
