"""The figure of a budget plan: where the steps went and what each block's held-out term did."""

from __future__ import annotations

from pathlib import Path

from ..auto.budget import Plan, read_plan
from ..errors import PSMError
from ..runs.run import Run
from . import use_agg

KIND_COLOURS = {"pilot-a": "0.7", "pilot-b": "0.5", "chunk": "C0", "explore": "C1",
                "cooldown": "C2"}  # fmt: skip


def plot_budget(run: Run, out: str | Path | None = None, plan: Plan | None = None) -> Path:
    """Write a PNG of a budget run: left, each block's steps stacked by the kind of round that
    gave them; right, each block's held-out term against its steps at the end of its rounds.

    Args:
        run: a run trained with ``--budget``.
        out: PNG path (default ``<run>/budget.png``).
        plan: the plan (default: read from the run).

    Returns:
        The path written.

    Raises:
        PSMError: the run has no budget plan.
    """
    from ..auto.budget import heldout_series

    plan = plan if plan is not None else read_plan(run.path)
    if plan is None or not plan.rounds:
        raise PSMError(f"{run.path} has no budget plan (budget.json)")
    plt = use_agg()
    out = Path(out) if out is not None else run.path / "budget.png"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    k = plan.blocks
    given = {kind: [0] * k for kind in KIND_COLOURS}
    before = [0] * k
    for r in plan.rounds:
        for b, t in r.targets.items():
            given.setdefault(r.kind, [0] * k)[b] += t - before[b]
            before[b] = t
    bottom = [0] * k
    for kind, steps in given.items():
        if any(steps):
            left.bar(range(k), steps, bottom=bottom, color=KIND_COLOURS.get(kind, "C3"),
                     label=kind)  # fmt: skip
            bottom = [a + s for a, s in zip(bottom, steps)]
    left.set_xticks(range(k), [run.partition.describe(b) for b in range(k)], rotation=30,
                    ha="right", fontsize=7)  # fmt: skip
    left.set_ylabel("steps")
    left.set_title(f"steps per block ({plan.spent()} of {plan.total} block-steps)", fontsize=9)
    left.legend(fontsize=7)
    for b in range(k):
        series = heldout_series(run, b)
        pts = [(r.targets[b], series[r.targets[b]]) for r in plan.rounds
               if r.targets.get(b) in series]  # fmt: skip
        if pts:
            xs, ys = zip(*pts)
            right.plot(xs, [y - ys[0] for y in ys], marker="o", markersize=3, lw=1,
                       label=f"block {b}" if k <= 10 else None)  # fmt: skip
    right.set_xlabel("steps")
    right.set_ylabel("held-out term − its first value (nats)")
    right.set_title("the signal the plan read (each block against itself)", fontsize=9)
    if k <= 10:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
