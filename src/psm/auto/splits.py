"""Split points from measurements: ``partition.kind: auto`` (issue 18, item 3).

A short pilot — one SA-DPM net over ``[t0, 1]``, ``partition.pilot_steps`` steps at a constant
learning rate, trained as an ordinary psm run beside the run (``<out>-pilot``) — measures the
held-out bound term (:mod:`psm.core.heldout`: ``½ g(t)² E‖s_θ + ε/σ‖²``, the score-matching
bound per unit time up to a constant) on ``CELLS`` cells of equal width in ``log t``, halfway
through and at the end. The fall of each cell's term over the second half says where the pilot
was still learning: the error a net could still remove there. The K - 1 inner boundaries are
placed at equal shares of that fall (mixed with a ``FLOOR`` share spread evenly over ``log t``,
so that no stretch of time is left without blocks), interpolated in ``log t`` inside a cell and
rounded to three significant digits (so that the last bits of a CPU's float arithmetic cannot
move them).

Both curves and the rule are written to ``<out>-pilot/splits.json``, and the splits for any K
follow from them alone (a repeated call, or one with another K on a copy of the pilot, places
them again from the recorded numbers). The run itself is an ordinary ``kind: splits`` run whose
``partition.chosen_by`` names the pilot (and is hashed, so a hand-placed run with the same
splits is another run).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.model import BlockModel
from ..errors import PSMError
from ..runs.atomic import atomic_write_json
from ..runs.config import RunConfig, parse_budget
from ..runs.inference import load_model
from ..runs.run import Run

CELLS = 48
"""Cells of equal width in ``log t`` over ``[t0, 1]`` on which the pilot is measured."""
POINTS = 512
"""Held-out points (and noise draws) per cell."""
FLOOR = 0.2
"""Share of the boundary weight spread evenly over ``log t``."""
CURVE_SEED = 7


@dataclass(frozen=True)
class AutoSplits:
    """What the pilot chose.

    Attributes:
        splits: ``[0, s_1, ..., s_{K-1}, 1]``.
        edges: the cells' edges in t, ``CELLS + 1`` values from t0 to 1.
        half: each cell's held-out term halfway through the pilot (nats).
        end: the same at the end.
        pilot: the pilot run's directory.
        pilot_steps: its steps (block-steps of compute, to count against a budget).
        seconds: wall time the pilot and its measurements took (recorded with the splits; a
            pilot stopped and resumed counts only its last call).
    """

    splits: list[float]
    edges: list[float]
    half: list[float]
    end: list[float]
    pilot: Path
    pilot_steps: int
    seconds: float


def cell_terms(model: BlockModel, x0: torch.Tensor, edges: list[float], seed: int) -> list[float]:
    """Each cell's held-out term ``∫_cell ½ g² E‖s_θ + ε/σ‖² dt`` (one node per cell, the
    midpoint in ``log t``; ``dt = t d log t``), on fixed points and noise.

    Args:
        model: a trained model (any number of blocks; routed by time).
        x0: held-out data, ``[P, *D]``.
        edges: cell edges in t, increasing, first > 0.
        seed: the noise seed (the same for every checkpoint compared: a paired series).

    Returns:
        One value per cell, nats (the bound's term plus a constant of the data).
    """
    gen = torch.Generator().manual_seed(seed)
    schedule = model.process.schedule
    out = []
    for lo, hi in itertools.pairwise(edges):
        width = math.log(hi) - math.log(lo)
        t = math.exp(0.5 * (math.log(lo) + math.log(hi)))
        c = schedule(torch.tensor(t, dtype=torch.float64))
        a, s, g2 = float(c.alpha), float(c.sigma), float(c.g2)
        noise = torch.randn(x0.shape, generator=gen)
        xt = a * x0 + s * noise
        with torch.no_grad():
            score = model.score(xt, torch.full((x0.shape[0],), t))
        err = (score.double() + noise.double() / s).flatten(1).pow(2).sum(1)
        out.append(0.5 * g2 * t * width * float(err.mean()))
    return out


def place_splits(edges: list[float], fall: list[float], blocks: int) -> list[float]:
    """``blocks - 1`` boundaries at equal shares of ``fall`` (negative values count as 0) mixed
    with :data:`FLOOR` spread evenly over the cells, interpolated in ``log t``, rounded to 3
    significant digits.

    Returns:
        ``[0, s_1, ..., 1]`` (strictly increasing).
    """
    pos = [max(f, 0.0) for f in fall]
    n = len(pos)
    total = sum(pos)
    mass = [
        (1 - FLOOR) * (p / total if total > 0 else 1.0 / n) + FLOOR / n for p in pos
    ]  # sums to 1
    cum = [0.0]
    for m in mass:
        cum.append(cum[-1] + m)
    logs = [math.log(e) for e in edges]
    inner: list[float] = []
    for k in range(1, blocks):
        q = k / blocks
        j = next(i for i in range(n) if cum[i + 1] >= q)
        frac = (q - cum[j]) / mass[j] if mass[j] > 0 else 0.5
        t = math.exp(logs[j] + frac * (logs[j + 1] - logs[j]))
        t = float(f"{t:.3g}")
        if inner and t <= inner[-1]:
            t = float(f"{inner[-1] * 1.01:.3g}") if inner[-1] * 1.01 < 1 else inner[-1]
        if t <= edges[0] or t >= 1.0 or (inner and t <= inner[-1]):
            raise PSMError(
                f"partition.kind auto: cannot place {blocks} blocks in [{edges[0]:.3g}, 1] "
                "(fewer blocks, or a longer pilot)"
            )
        inner.append(t)
    return [0.0, *inner, 1.0]


def pilot_config(cfg: RunConfig, steps: int) -> RunConfig:
    """The pilot: ``cfg``'s data, process, net and recipe, one block over ``[t0, 1]``, ``steps``
    steps at a constant learning rate (warm-up kept), no budget."""
    raw = cfg.model_dump(mode="json")
    raw["name"] = f"{cfg.name}-pilot"
    raw["out"] = str(pilot_dir(cfg))
    raw["partition"] = {"kind": "equal", "blocks": 1, "t0": cfg.partition.t0}
    raw.pop("blocks", None)  # per-block settings belong to the split run, not its pilot
    train = raw["train"]
    train.update(steps=steps, lr_schedule="constant", block_steps=None, block_decay=None,
                 budget=None)  # fmt: skip
    from ..runs.config import validate_config

    return validate_config(raw, "the auto-partition pilot")


def pilot_dir(cfg: RunConfig) -> Path:
    """Where the pilot lives: beside the run, ``<out>-pilot``."""
    out = cfg.out_dir
    return out.with_name(out.name + "-pilot")


PILOT_STEPS = 4000
"""The pilot's steps when ``partition.pilot_steps`` is not set and no block-step budget is."""
PILOT_SHARE = 0.02
"""With a block-step ``--budget`` and no ``partition.pilot_steps``: the pilot's share of it."""


def pilot_steps_of(cfg: RunConfig) -> int:
    """The pilot's steps: ``partition.pilot_steps`` if set; else, with a block-step budget,
    ``PILOT_SHARE`` of it (at least ``PILOT_STEPS``: a pilot long enough that its fall stands
    above its noise grows with what the blocks will get); else ``PILOT_STEPS``. A time budget's
    block-steps are not known before the pilot, so it gets ``PILOT_STEPS``."""
    if cfg.partition.pilot_steps:
        return int(cfg.partition.pilot_steps)
    budget = cfg.train.budget
    if budget is not None:
        kind, amount = parse_budget(budget.total)
        if kind == "steps":
            return max(PILOT_STEPS, round(PILOT_SHARE * amount))
    return PILOT_STEPS


def choose_splits(cfg: RunConfig, executor, *, log: Callable[[str], None] = print) -> AutoSplits:
    """Train (or reuse) the pilot and place the splits (module docstring).

    Args:
        cfg: a config with ``partition.kind: auto`` (``blocks``: K, ``pilot_steps``: N).
        executor: trains the pilot's block.
        log: where the lines for people go.
    """
    p = cfg.partition
    steps = pilot_steps_of(cfg)
    if steps < 2:
        raise PSMError("partition.pilot_steps must be >= 2")
    record = pilot_dir(cfg) / "splits.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved.get("pilot_steps") != steps:
            raise PSMError(
                f"{record} holds the curves of a {saved.get('pilot_steps')}-step pilot, not "
                f"{steps}: use another --out"
            )
        edges, half, end = saved["edges"], saved["half"], saved["end"]
        seconds = float(saved.get("seconds", 0.0))
    else:
        edges, half, end, seconds = _pilot_curves(cfg, executor, steps, log)
        atomic_write_json(record, {
            "pilot_steps": steps, "edges": edges, "half": half, "end": end,
            "rule": f"equal shares of the fall between steps {steps // 2} and {steps}, "
            f"{FLOOR:.0%} spread evenly over log t", "cells": CELLS, "points": POINTS,
            "seconds": seconds,
        })  # fmt: skip
    # the splits follow from the recorded curves alone: any K, the same on every machine
    chosen = place_splits(edges, [h - e for h, e in zip(half, end)], p.blocks)
    log(
        f"auto partition: {p.blocks} blocks at {chosen} (equal shares of the pilot's fall "
        f"between steps {steps // 2} and {steps}; curves in {record})"
    )
    return AutoSplits(chosen, edges, half, end, record.parent, steps, seconds)


def _pilot_curves(
    cfg: RunConfig, executor, steps: int, log: Callable[[str], None]
) -> tuple[list[float], list[float], list[float], float]:
    """Train the pilot to half its steps and to the end, measuring the cells at both:
    ``(edges, half, end, seconds)``. The half curve is saved before the pilot goes on (its
    weights there are then overwritten)."""
    t_start = time.perf_counter()
    p = cfg.partition
    edges = [math.exp(v) for v in torch.linspace(math.log(p.t0), 0.0, CELLS + 1).tolist()]
    edges[-1] = 1.0
    curves = pilot_dir(cfg) / "curves.json"
    half_steps = steps // 2
    half: list[float] | None = None
    if curves.exists():
        half = json.loads(curves.read_text()).get("half")
    x0 = None
    end: list[float] = []
    for target in (half_steps, steps):
        if target == half_steps and half is not None:
            continue
        run = Run.create(pilot_config(cfg, target))
        if target == half_steps and int((run.ledger.read(0) or {}).get("step", 0)) > target:
            raise PSMError(
                f"auto partition: the pilot {run.path} is past step {target} but its curve "
                "there was not recorded: remove the pilot folder and run again"
            )
        todo = run.ledger.not_done([0], invocation=True)
        log(f"auto partition: pilot {run.path} (1 block, SA-DPM) to {target} steps")
        outcomes = executor.run(run, todo) if todo else []
        bad = [o for o in outcomes if o.state != "done"]
        if bad:
            raise PSMError(f"auto partition: the pilot stopped ({bad[0].state}: {bad[0].error})")
        model = load_model(run)
        if x0 is None:
            x0 = run.dataset.test_set(POINTS, seed=CURVE_SEED)
        terms = cell_terms(model, x0.float(), edges, CURVE_SEED)
        if target == half_steps:
            half = terms
            atomic_write_json(curves, {"edges": edges, "half": half})
        else:
            end = terms
    assert half is not None
    return edges, half, end, time.perf_counter() - t_start


def resolve(cfg: RunConfig, choice: AutoSplits) -> RunConfig:
    """``cfg`` with its ``auto`` partition replaced by the chosen splits (an ordinary
    ``splits`` run whose ``chosen_by`` names the pilot)."""
    from ..runs.config import validate_config

    raw = cfg.model_dump(mode="json")
    raw["partition"] = {
        "kind": "splits", "splits": choice.splits, "t0": cfg.partition.t0,
        "chosen_by": f"auto: {cfg.partition.blocks} blocks from a {choice.pilot_steps}-step "
        f"SA-DPM pilot ({choice.pilot.name})",
    }  # fmt: skip
    return validate_config(raw, "the auto partition")
