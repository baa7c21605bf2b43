"""Budgets from measurements: psm gives each block its steps (``psm train --budget``).

A run with ``train.budget`` is trained in rounds. Before each round the plan
(:func:`next_round`, a pure function of step counts and held-out losses) names the blocks to
train and their new step targets, and says why; the round is recorded in ``budget.json`` before
it runs, so a stopped call resumes it and a repeated call continues the same plan. The run's
``train.block_steps`` follow the plan, so the finished run is an ordinary psm run that
``psm nll``, ``sample`` and ``plot`` read unchanged.

The rule (docs/auto.md):

1. **Pilot.** Every block trains ``pilot`` of the total, in two equal halves (``pilot-a``,
   ``pilot-b``); a time budget's first half is ``probe`` steps per block, whose wall time gives
   the rate that turns the time into block-steps.
2. **Chunks.** A round gives ``chunk`` of the total to each of W blocks (W: the executor's
   workers, so a round keeps every worker busy): the W blocks whose held-out bound term
   (:mod:`psm.core.heldout`, ``"heldout"`` in the metrics) fell fastest per step over their own
   last chunk. A rate is measured only when a block trains, so it is stale for the others; with
   diminishing returns a stale rate is optimistic, and every ``explore_every``-th round gives
   ``explore_share`` of a chunk to the W blocks with the fewest steps instead, so no block is
   starved by one noisy chunk (a short round: it measures a rate, it is not a share of the
   budget).
   With ``rule: trend`` the rate is the fall per step over the next chunk that a fit of the
   held-out term against ``ln(steps)`` over the block's last doubling predicts
   (:func:`fall_per_doubling`, :func:`trend_gain`): it reads every measurement of that
   stretch, not two, and for terms falling like ``a − c ln s`` it ends with steps in
   proportion to ``c``, the allocation that minimises their sum.
   Ties go to fewer steps, then to the lower block id.
3. **Cool-down.** With a decaying ``lr_schedule``, the last ``cooldown`` of the total is shared
   among the blocks in proportion to the steps they got, and the learning rate decays to 0 over
   it (``train.block_decay``: warm-up, constant, then decay — the rate stays constant during
   the chunks, whose targets are not known in advance).

Decisions read step counts and losses only, never the clock (a time budget's rate, measured
once, is recorded in the plan).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PSMError, RunError
from ..runs.atomic import atomic_write_json
from ..runs.config import BudgetConfig, RunConfig, parse_budget
from ..runs.run import Run
from ..runs.run_parts import Parts

PLAN_FILE = "budget.json"


@dataclass
class Round:
    """One round of a plan: the blocks trained, their new targets, and why.

    Attributes:
        index: the round number (0 first).
        kind: ``pilot-a``, ``pilot-b``, ``chunk``, ``explore`` or ``cooldown``.
        targets: block id -> its new step target.
        decay: block id -> the step its learning rate decays from (``cooldown`` only).
        reason: one line for people.
        rates: block id -> the fall per step of its held-out term that the choice read.
        seconds: the round's wall time (measured after it ran; informational, except for a
            time budget's first round, whose rate is recorded in the plan).
    """

    index: int
    kind: str
    targets: dict[int, int]
    decay: dict[int, int] = field(default_factory=dict)
    reason: str = ""
    rates: dict[int, float] = field(default_factory=dict)
    seconds: float | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Round:
        return cls(
            index=int(raw["index"]), kind=str(raw["kind"]),
            targets={int(k): int(v) for k, v in raw["targets"].items()},
            decay={int(k): int(v) for k, v in raw.get("decay", {}).items()},
            reason=str(raw.get("reason", "")),
            rates={int(k): float(v) for k, v in raw.get("rates", {}).items()},
            seconds=raw.get("seconds"),
        )  # fmt: skip


@dataclass
class Plan:
    """A run's budget plan (``budget.json``).

    Attributes:
        blocks: K.
        width: blocks per chunk round (the executor's workers).
        decays: whether the learning-rate schedule decays (then a cool-down ends the plan).
        total: the budget in block-steps (None until a time budget's rate is measured).
        seconds: a time budget's seconds (None for a block-step budget).
        rate: a time budget's measured block-steps per second (over the probe).
        steady_rate: the same over the pilot's second half, a round long enough that the
            start-up (processes, nets, data) is a small part of it: it re-sets the total once,
            to the block-steps spent plus this rate times the seconds left.
        rounds: the rounds decided so far, in order.
    """

    blocks: int
    width: int
    decays: bool
    total: int | None
    seconds: float | None = None
    rate: float | None = None
    spent_before: int = 0  # block-steps of an auto-partition pilot, taken from the total
    rounds: list[Round] = field(default_factory=list)
    rule: str = "rate"  # how chunk rounds rank blocks (``train.budget.rule``)
    steady_rate: float | None = None  # a time budget's rate over the pilot's second half

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["rounds"] = [asdict(r) for r in self.rounds]
        return d

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Plan:
        rounds = [Round.from_json(r) for r in raw.get("rounds", [])]
        return cls(
            blocks=int(raw["blocks"]), width=int(raw["width"]), decays=bool(raw["decays"]),
            total=raw.get("total"), seconds=raw.get("seconds"), rate=raw.get("rate"),
            spent_before=int(raw.get("spent_before", 0)), rounds=rounds,
            rule=str(raw.get("rule", "rate")), steady_rate=raw.get("steady_rate"),
        )  # fmt: skip

    def targets(self) -> list[int]:
        """Each block's step target after the rounds so far (0 before its first)."""
        out = [0] * self.blocks
        for r in self.rounds:
            for b, t in r.targets.items():
                out[b] = max(out[b], t)
        return out

    def decay_starts(self) -> list[int]:
        """Each block's decay start: its cool-down start, else its target (no decay)."""
        out = self.targets()
        for r in self.rounds:
            for b, d in r.decay.items():
                out[b] = d
        return out

    def spent(self) -> int:
        """Block-steps given so far."""
        return sum(self.targets())


# ------------------------------------------------------------------ the rule (pure)
Observations = dict[int, list[tuple[int, float]]]
"""Block id -> ``(step, held-out term)`` at the end of each round it trained in, in order."""


def fall_rate(obs: list[tuple[int, float]]) -> float | None:
    """How fast a block's held-out term fell per step over its last chunk (None: fewer than
    two measurements)."""
    if len(obs) < 2:
        return None
    (s0, h0), (s1, h1) = obs[-2], obs[-1]
    return (h0 - h1) / (s1 - s0) if s1 > s0 else None


def fall_per_doubling(points: list[tuple[int, float]]) -> float | None:
    """The fall of a held-out term per e-fold of steps over a block's last doubling.

    Fits ``h(s) = a − c ln s`` by least squares to the measurements with ``s`` in
    ``[n/2, n]`` (``n``: the last step), and returns ``c`` (its fall per doubling is
    ``c ln 2``). With fewer than three points in that window, the fit uses all the points
    given. None: fewer than two points, or all at one step.

    Args:
        points: ``(step, held-out term)`` pairs, steps > 0, in increasing order of step.
    """
    if len(points) < 2:
        return None
    n = points[-1][0]
    window = [(s, h) for s, h in points if s >= n / 2]
    use = window if len(window) >= 3 else list(points)
    xs = [math.log(s) for s, _ in use]
    ys = [h for _, h in use]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= 0.0:
        return None
    return -sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def trend_gain(points: list[tuple[int, float]], steps: int, chunk: int) -> float | None:
    """The fall per step that a block's fitted trend (:func:`fall_per_doubling`) predicts for
    its next ``chunk`` steps from ``steps``: ``c ln((steps + chunk)/steps) / chunk``."""
    c = fall_per_doubling(points)
    if c is None or steps <= 0:
        return None
    return c * math.log((steps + chunk) / steps) / chunk


def next_round(
    spec: BudgetConfig,
    plan: Plan,
    obs: Observations,
    series: Observations | None = None,
) -> Round | None:
    """The next round of a plan, or None when the budget is spent (module docstring).

    Args:
        spec: the ``train.budget`` rule.
        plan: the plan so far (``total`` must be known after the first round).
        obs: each block's held-out term at the end of its rounds.
        series: each block's every held-out measurement up to its current target, in order of
            step (the ``trend`` rule fits them; None: the rule uses ``obs``).
    """
    k, idx = plan.blocks, len(plan.rounds)
    kind_of = [r.kind for r in plan.rounds]
    if "pilot-a" not in kind_of:
        if plan.total is None:
            a = spec.probe
            why = f"pilot, first half: {a} steps per block (the probe that measures the rate)"
        else:
            a = max(1, round(spec.pilot * plan.total / (2 * k)))
            why = f"pilot, first half: {a} steps per block"
        return Round(idx, "pilot-a", dict.fromkeys(range(k), a), reason=why)
    assert plan.total is not None, "a time budget's total is set after its first round"
    total = plan.total
    targets = plan.targets()
    if "pilot-b" not in kind_of:
        p = max(max(targets) + 1, round(spec.pilot * total / k))
        return Round(idx, "pilot-b", dict.fromkeys(range(k), p),
                     reason=f"pilot, second half: to {p} steps per block")  # fmt: skip
    if "cooldown" in kind_of:
        return None
    reserve = round(spec.cooldown * total) if plan.decays else 0
    chunk = max(1, round(spec.chunk * total))
    free = total - reserve - sum(targets)
    width = min(plan.width, k)
    if free >= chunk or (not plan.decays and 4 * free >= chunk):  # a last, partial chunk
        n = min(width, free // chunk) if free >= chunk else min(width, free)
        chunk = min(chunk, free // n)
        chunks_done = sum(1 for r in plan.rounds if r.kind in ("chunk", "explore"))
        if spec.rule == "trend":
            rates = {b: trend_gain((series or obs).get(b, []), targets[b], chunk) for b in range(k)}
        else:
            rates = {b: fall_rate(obs.get(b, [])) for b in range(k)}
        known = {b: r for b, r in rates.items() if r is not None}
        explore = spec.explore_every > 0 and (chunks_done + 1) % spec.explore_every == 0
        if explore:  # a measurement, not a share of the budget: a fraction of a chunk
            chosen = sorted(range(k), key=lambda b: (targets[b], b))[:n]
            chunk = max(1, round(spec.explore_share * chunk))
            why = "explore: the blocks with the fewest steps"
            kind = "explore"
        else:
            chosen = sorted(range(k), key=lambda b: (-known.get(b, math.inf), targets[b], b))[:n]
            why = (
                "largest fall per step predicted by each block's fitted trend (its held-out "
                "term against log steps over its last doubling)"
                if spec.rule == "trend"
                else "fastest falling held-out term per step"
            )
            kind = "chunk"
        return Round(idx, kind, {b: targets[b] + chunk for b in chosen}, reason=why,
                     rates={b: known[b] for b in chosen if b in known})  # fmt: skip
    left = total - sum(targets)
    if not plan.decays or left <= 0:
        return None
    weight = sum(targets)
    extra = [left * t // weight for t in targets]
    for b in sorted(range(k), key=lambda b: (-targets[b], b))[: left - sum(extra)]:
        extra[b] += 1  # the remainder to the blocks with the most steps
    new = {b: targets[b] + extra[b] for b in range(k) if extra[b] > 0}
    return Round(idx, "cooldown", new, decay={b: targets[b] for b in new},
                 reason=f"cool-down: {left} block-steps in proportion to each block's steps, "
                 "the learning rate decaying to 0")  # fmt: skip


# ------------------------------------------------------------------ the driver
def plan_path(run_dir: Path) -> Path:
    return Path(run_dir) / PLAN_FILE


def read_plan(run_dir: Path) -> Plan | None:
    """The plan recorded in a run, or None."""
    path = plan_path(run_dir)
    if not path.exists():
        return None
    try:
        return Plan.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{path} is not a psm budget plan ({e})") from None


def heldout_series(run: Run, block: int) -> dict[int, float]:
    """Block ``block``'s held-out terms by step, read once from its metrics file (the last line
    of a step wins)."""
    path = run.layout.metrics(block)
    out: dict[int, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("heldout") is not None and "step" in rec:
                out[int(rec["step"])] = float(rec["heldout"])
    return out


def heldout_at(run: Run, block: int, step: int, series: dict[int, float] | None = None) -> float:
    """Block ``block``'s held-out term at ``step`` (from ``series`` when given)."""
    value = (series if series is not None else heldout_series(run, block)).get(step)
    if value is None:
        raise RunError(
            f"block {block}: no held-out measurement at step {step} in "
            f"{run.layout.metrics(block)} (a budget run needs the held-out signal: "
            "train.heldout_every > 0)"
        )
    return value


def observations(
    run: Run, plan: Plan, series: dict[int, dict[int, float]] | None = None
) -> Observations:
    """Each block's held-out term at the end of the rounds it trained in (completed rounds);
    each metrics file is read once (``series``: the files already read, by block)."""
    if series is None:
        series = {b: heldout_series(run, b) for b in range(plan.blocks)}
    obs: Observations = {}
    for r in plan.rounds:
        for b, t in r.targets.items():
            obs.setdefault(b, []).append((t, heldout_at(run, b, t, series[b])))
    return obs


def measured_series(plan: Plan, series: dict[int, dict[int, float]]) -> Observations:
    """Each block's every held-out measurement up to its current target (the ``trend`` rule's
    input), in order of step, from its metrics (``series``, by block; :func:`heldout_series`).
    Deterministic like the targets: the values at a step do not depend on how the calls were
    split."""
    targets = plan.targets()
    return {
        b: [(s, series[b][s]) for s in sorted(series[b]) if 0 < s <= targets[b]]
        for b in range(plan.blocks)
    }


def width_of(cfg: RunConfig, executor=None) -> int:
    """Blocks per chunk round: the executor's workers (its ``--workers`` flag, else the
    config's ``executor.workers``; 1 for executors without the option)."""
    workers = getattr(executor, "workers", None) or getattr(cfg.executor, "workers", None)
    return int(workers or 1)


def planned_config(cfg: RunConfig, plan: Plan) -> RunConfig:
    """``cfg`` with the plan's targets and decay starts (blocks not yet trained: 1 step, never
    asked for)."""
    targets = [max(1, t) for t in plan.targets()]
    train = cfg.train.model_copy(
        update={"block_steps": targets, "block_decay": plan.decay_starts()}
    )
    return cfg.model_copy(update={"train": train})


def train_budget(
    cfg: RunConfig,
    executor,
    *,
    parts: Parts | None = None,
    log: Callable[[str], None] = print,
    spent_before: int = 0,
    seconds_before: float = 0.0,
    max_rounds: int | None = None,
) -> tuple[Run, list]:
    """Train a run under ``train.budget``, round by round, resuming its recorded plan.

    Args:
        cfg: the run's config (``train.budget`` set).
        executor: trains a round's blocks (``executor.run(run, blocks)``).
        parts: the run's parts, when already built.
        log: where the plan's lines go.
        spent_before: block-steps already spent on the run's behalf (an auto-partition pilot),
            taken from a block-step budget.
        seconds_before: wall seconds already spent, taken from a time budget.
        max_rounds: stop after this many rounds of this call (tests; None: to the end).

    Returns:
        The run and the last round's outcomes (empty when nothing was left to train).
    """
    spec = cfg.train.budget
    if spec is None:
        raise PSMError("train_budget needs train.budget")
    if cfg.train.heldout_every <= 0:
        raise PSMError("a budget run needs the held-out signal: train.heldout_every > 0")
    kind, amount = parse_budget(spec.total)
    k = cfg.partition.build().num_blocks
    plan = read_plan(cfg.out_dir) if (cfg.out_dir / "config.yaml").exists() else None
    run = Run.create(planned_config(cfg, plan) if plan else cfg, parts=parts)
    if plan is None:
        total = None
        if kind == "steps":
            total = int(amount) - spent_before
            if total < 2 * k:
                raise PSMError(
                    f"budget {spec.total}: {total} block-steps left for {k} blocks after the "
                    f"pilot's {spent_before}"
                )
        plan = Plan(
            blocks=k, width=width_of(cfg, executor), decays=cfg.train.lr_schedule != "constant",
            total=total, seconds=amount - seconds_before if kind == "seconds" else None,
            spent_before=spent_before, rule=spec.rule,
        )  # fmt: skip
        atomic_write_json(plan_path(run.path), plan.to_json())
    outcomes: list = []
    rounds = 0
    while True:
        if plan.rounds and not _complete(run, plan.rounds[-1]):
            current = plan.rounds[-1]  # resume the round a stopped call left
        else:
            read = {b: heldout_series(run, b) for b in range(plan.blocks)}
            trend = measured_series(plan, read) if spec.rule == "trend" else None
            current = next_round(spec, plan, observations(run, plan, read), trend)
            if current is None:
                break
            plan.rounds.append(current)
            atomic_write_json(plan_path(run.path), plan.to_json())
        run = Run.create(planned_config(cfg, plan), parts=run.parts)
        blocks = sorted(current.targets)
        log(_round_line(current, plan))
        t0 = time.perf_counter()
        todo = run.ledger.not_done(blocks, invocation=True)
        before = {b: int((run.ledger.read(b) or {}).get("step") or 0) for b in todo}
        outcomes = executor.run(run, todo) if todo else []
        current.seconds = round(time.perf_counter() - t0, 3)
        if plan.total is None:  # a time budget: the first round measured the rate
            done = sum(current.targets.values())
            plan.rate = done / max(current.seconds, 1e-9)
            plan.total = int(plan.rate * plan.seconds)  # type: ignore[operator]
            log(
                f"budget: {done} block-steps took {current.seconds:.1f}s, "
                f"{plan.rate:.0f} block-steps/s: {plan.seconds:.0f}s is {plan.total} block-steps"
            )
        failed = any(o.state in ("failed", "interrupted", "locked") for o in outcomes)
        if plan.seconds is not None and current.kind == "pilot-b" and not failed:
            _steady_total(plan, current, sum(current.targets[b] - before[b] for b in todo), log)
        atomic_write_json(plan_path(run.path), plan.to_json())
        if failed:
            return run, outcomes
        rounds += 1
        if max_rounds is not None and rounds >= max_rounds:
            return run, outcomes
    targets = plan.targets()
    log(
        f"budget spent: {sum(targets)} of {plan.total} block-steps in {len(plan.rounds)} "
        f"rounds; steps per block {', '.join(map(str, targets))} (see {plan_path(run.path)})"
    )
    return run, outcomes


def _steady_total(plan: Plan, r: Round, trained: int, log: Callable[[str], None]) -> None:
    """A time budget, after the pilot's second half (``trained`` block-steps in ``r.seconds``):
    re-set the total once from that round's rate, which the probe's start-up does not weigh
    on (the probe's rate ran at about 0.75 of it on TY's 2D runs)."""
    if plan.steady_rate is not None or trained <= 0 or not r.seconds:
        return
    plan.steady_rate = trained / r.seconds
    left = max(0.0, plan.seconds - sum(x.seconds or 0.0 for x in plan.rounds))  # type: ignore[operator]
    spent = plan.spent()
    plan.total = spent + int(plan.steady_rate * left)
    log(
        f"budget: the pilot's second half ran {trained} block-steps in {r.seconds:.1f}s, "
        f"{plan.steady_rate:.0f} block-steps/s: {spent} spent + {left:.0f}s left is "
        f"{plan.total} block-steps"
    )


def _complete(run: Run, r: Round) -> bool:
    return all(run.ledger.done(b, t) for b, t in r.targets.items())


def _round_line(r: Round, plan: Plan) -> str:
    def fmt(b: int) -> str:
        verb = "would fall" if plan.rule == "trend" else "fell"
        rate = f", {verb} {r.rates[b]:.3g}/step" if b in r.rates else ""
        return f"{b}->{r.targets[b]}{rate}"

    shown = ", ".join(fmt(b) for b in sorted(r.targets)[:8])
    more = f" (+{len(r.targets) - 8} more)" if len(r.targets) > 8 else ""
    spent = sum(plan.targets())
    total = f"{spent}/{plan.total}" if plan.total is not None else f"{spent}/?"
    return f"budget round {r.index} [{r.kind}] {total} block-steps: {r.reason}; {shown}{more}"
