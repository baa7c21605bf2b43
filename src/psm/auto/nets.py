"""Each block's net and objective from measurements: a race of candidates
(``train.budget.candidates``).

Which net and objective a block needs depends on its time range: near t = 0 the 2D recipes'
MLP learns nothing, and learns with Fourier features of x, a predicted score and the
likelihood objective (docs/results.md, "A block near t = 0 that learns"), while the same
change is not wanted everywhere. With candidates given, psm measures instead of asking:

1. **Race.** Each candidate (a partial ``net:`` and ``objective:``, merged onto the run's as in
   ``blocks:``; ``{}`` is the run's own) trains every block of the run's partition for the same
   number of steps, at a constant learning rate after the recipe's warm-up, as an ordinary psm
   run beside the run (``<out>-race/<j>``). The steps: ``race`` of a block-step budget shared by
   the candidates and blocks (``race × total / (C K)`` each); with a time budget, whose
   block-steps are not known yet, :data:`RACE_STEPS`.
2. **Choice.** Each block keeps the candidate that scores lowest at the race's end; ties go to
   the earlier candidate. ``race_by: heldout`` (the default) scores a block by its held-out
   bound term (:mod:`psm.core.heldout`, the block's term of the score-matching bound plus a
   constant of the data that does not depend on the net, its objective or its
   parameterisation; comparable because every candidate is measured on the block's same fixed
   held-out batch). That bound is the reverse SDE's; psm's NLL is the probability-flow ODE's,
   which it does not control (docs/results.md: on TY Fourier features lower block 4's bound
   term and raise what it costs the ODE). ``race_by: nll`` scores the ODE itself, for any
   data: candidate 0's race model with block b taken from candidate j's, its NLL on
   :data:`RACE_NLL_POINTS` held-out points (seed ``HELDOUT_SEED``, not the NLL's test seed)
   with RK4 and :data:`RACE_NLL_STEPS` steps, less candidate 0's own on the same points
   (paired). Cost: one solve per block and candidate.
3. **The run.** The chosen candidates become the run's ``blocks:`` entries (``chosen_by``
   names the race) and the budget's plan starts from step 0 as usual; the race's block-steps
   (or seconds) are taken from the budget.

``<out>-race/race.json`` records the steps, the candidates, every block's terms and the
choice; a repeated call reads it (a record of another race is refused). The choice follows
from step counts and losses only, so it is the same on every machine that trains the race's
blocks to the same weights.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PSMError
from ..runs.atomic import atomic_write_json
from ..runs.config import Candidate, RunConfig, parse_budget, validate_config
from ..runs.run import Run

RACE_STEPS = 2000
"""Steps per block and candidate when the budget is a time (its block-steps are not known)."""
RACE_NLL_POINTS = 1000
"""``race_by: nll``: held-out points each swap is scored on (fewer for a smaller test split)."""
RACE_NLL_STEPS = 200
"""``race_by: nll``: RK4 steps over ``[t0, 1]`` of each swap's solve."""


@dataclass(frozen=True)
class NetRace:
    """What the race chose.

    Attributes:
        choice: block id -> the index of the candidate it keeps.
        terms: ``terms[j][b]``: block b's score under candidate j at the race's end (its
            held-out term, or with ``race_by: nll`` the NLL change of swapping it in; 0 for
            candidate 0).
        steps: steps per block and candidate.
        block_steps: the race's compute, ``steps × K × C`` (taken from a block-step budget).
        seconds: its wall time (taken from a time budget; a resumed race counts its last call).
        folder: ``<out>-race``.
    """

    choice: list[int]
    terms: list[list[float]]
    steps: int
    block_steps: int
    seconds: float
    folder: Path


def race_dir(cfg: RunConfig) -> Path:
    """Where the race lives: beside the run, ``<out>-race``."""
    out = cfg.out_dir
    return out.with_name(out.name + "-race")


def race_steps_of(cfg: RunConfig) -> int:
    """Steps per block and candidate: ``race × total / (C K)`` of a block-step budget (at least
    2), :data:`RACE_STEPS` for a time budget."""
    budget = cfg.train.budget
    assert budget is not None and budget.candidates, "a race needs train.budget.candidates"
    kind, amount = parse_budget(budget.total)
    if kind != "steps":
        return RACE_STEPS
    k = cfg.partition.build().num_blocks
    return max(2, round(budget.race * amount / (len(budget.candidates) * k)))


def pick(terms: list[list[float]]) -> list[int]:
    """Each block's candidate: the lowest term, ties to the earlier candidate.

    Args:
        terms: ``terms[j][b]``, C lists of K values.
    """
    k = len(terms[0])
    return [min(range(len(terms)), key=lambda j: (terms[j][b], j)) for b in range(k)]


def chosen_blocks(
    candidates: list[Candidate], choice: list[int], chosen_by: str
) -> list[dict[str, Any]]:
    """``blocks:`` entries for a choice: one per run of neighbouring blocks that keep the same
    candidate, none where it is ``{}`` (the run's own)."""
    out: list[dict[str, Any]] = []
    b = 0
    for j, group in itertools.groupby(choice):
        n = len(list(group))
        c = candidates[j]
        if c.net or c.objective:
            entry: dict[str, Any] = {"first": b, "last": b + n - 1, "chosen_by": chosen_by}
            if c.net:
                entry["net"] = dict(c.net)
            if c.objective:
                entry["objective"] = dict(c.objective)
            out.append(entry)
        b += n
    return out


def race_config(cfg: RunConfig, j: int, steps: int) -> RunConfig:
    """Candidate ``j``'s race run: ``cfg``'s data, process, partition and recipe with the
    candidate on every block, ``steps`` steps each at a constant learning rate (warm-up kept),
    no budget."""
    budget = cfg.train.budget
    assert budget is not None and budget.candidates
    c = budget.candidates[j]
    raw = cfg.model_dump(mode="json")
    raw["name"] = f"{cfg.name}-race{j}"
    raw["out"] = str(race_dir(cfg) / str(j))
    k = cfg.partition.build().num_blocks
    raw["blocks"] = (
        [{"first": 0, "last": k - 1, "net": c.net, "objective": c.objective}]
        if c.net or c.objective
        else []
    )
    raw["train"].update(steps=steps, lr_schedule="constant", block_steps=None,
                        block_decay=None, budget=None)  # fmt: skip
    return validate_config(raw, f"race candidate {j}")


def choose_nets(cfg: RunConfig, executor, *, log: Callable[[str], None] = print) -> NetRace:
    """Train (or reuse) the race and choose each block's candidate (module docstring)."""
    from .budget import heldout_at

    budget = cfg.train.budget
    assert budget is not None and budget.candidates
    steps = race_steps_of(cfg)
    partition = cfg.partition.build()
    k, splits = partition.num_blocks, list(partition.edges)
    folder = race_dir(cfg)
    record = folder / "race.json"
    cands = [c.model_dump(mode="json", exclude_none=True) for c in budget.candidates]
    signal = budget.race_by
    if record.exists():
        saved = json.loads(record.read_text())
        if (saved.get("steps"), saved.get("candidates"), saved.get("edges"),
                saved.get("signal", "heldout")) != (steps, cands, splits, signal):  # fmt: skip
            raise PSMError(
                f"{record} holds another race (steps, candidates or blocks differ): use "
                "another --out"
            )
        terms, seconds = saved["terms"], float(saved.get("seconds", 0.0))
    else:
        t_start = time.perf_counter()
        terms, runs = [], []
        for j in range(len(cands)):
            run = Run.create(race_config(cfg, j, steps))
            todo = run.ledger.not_done(list(range(k)), invocation=True)
            what = json.dumps(cands[j]) if cands[j] else "{} (the run's own)"
            log(f"net race: candidate {j} {what} on {k} blocks, {steps} steps each ({run.path})")
            outcomes = executor.run(run, todo) if todo else []
            bad = [o for o in outcomes if o.state != "done"]
            if bad:
                raise PSMError(f"net race: candidate {j} stopped ({bad[0].state}: {bad[0].error})")
            if signal == "heldout":
                terms.append([heldout_at(run, b, steps) for b in range(k)])
            runs.append(run)
        if signal == "nll":
            log(f"net race: scoring {(len(runs) - 1) * k + 1} swapped models by their held-out "
                f"ODE NLL ({RACE_NLL_POINTS} points, RK4 {RACE_NLL_STEPS} steps)")  # fmt: skip
            terms = swap_terms(runs)
        seconds = time.perf_counter() - t_start
        atomic_write_json(record, {
            "steps": steps, "candidates": cands, "edges": splits, "terms": terms,
            "choice": pick(terms), "seconds": seconds, "signal": signal,
            "rule": f"each block keeps the candidate with the lowest {_WHAT[signal]} at the end",
        })  # fmt: skip
    choice = pick(terms)
    log(
        f"net race: each block keeps the candidate with the lowest {_WHAT[signal]} after "
        f"{steps} steps: {', '.join(f'{b}->{j}' for b, j in enumerate(choice))} "
        f"(terms in {record})"
    )
    return NetRace(choice, terms, steps, steps * k * len(cands), seconds, folder)


_WHAT = {"heldout": "held-out term", "nll": "held-out ODE NLL with the block swapped in"}


def swap_terms(runs: list[Run]) -> list[list[float]]:
    """``race_by: nll``: ``terms[j][b]``, the mean change of the held-out ODE NLL when block b of
    candidate 0's model is taken from candidate j's (0 for candidate 0), paired on the same
    points (module docstring)."""
    from ..core.heldout import HELDOUT_SEED
    from ..core.model import BlockModel
    from ..core.ode import SolverSettings
    from ..runs.inference import eval_settings, evaluate_model, load_model, open_source

    settings = eval_settings(open_source(runs[0]),
                             solver=SolverSettings("rk4", steps=RACE_NLL_STEPS))  # fmt: skip
    dataset = runs[0].dataset

    def nll(model: BlockModel):
        ev = evaluate_model(model, dataset, n=RACE_NLL_POINTS, test_seed=HELDOUT_SEED,
                            settings=settings, progress=False)  # fmt: skip
        return ev.result.values.double()

    base = load_model(runs[0])
    ref = nll(base)
    terms = [[0.0] * base.num_blocks]
    for run in runs[1:]:
        other = load_model(run)
        row = []
        for b in range(base.num_blocks):
            blocks = list(base.blocks)
            blocks[b] = other.blocks[b]
            swapped = BlockModel(base.process, base.partition, blocks,
                                 grid_field=base.grid_field, shape=base.shape)  # fmt: skip
            row.append(float((nll(swapped) - ref).mean()))
        terms.append(row)
    return terms


def resolve_nets(cfg: RunConfig, race: NetRace) -> RunConfig:
    """``cfg`` with the race's choice as its ``blocks:`` entries (``chosen_by`` names it)."""
    budget = cfg.train.budget
    assert budget is not None and budget.candidates
    raw = cfg.model_dump(mode="json")
    raw["blocks"] = chosen_blocks(
        budget.candidates, race.choice,
        f"net race: {len(budget.candidates)} candidates, {race.steps} steps per block, by "
        f"{budget.race_by} ({race.folder.name})",
    )  # fmt: skip
    return validate_config(raw, "the net race")
