"""What ``psm reproduce`` writes for a person: the tables beside the paper's numbers
(``results.md``), the same as data (``results.json``), the curves of NLL against training
compute (``nll_vs_compute.png``) and the density maps of every method (``density_<data>.png``)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

from ..runs.atomic import atomic_write_json, atomic_write_text
from ..runs.run import Run
from .catalogue import BUDGETS, BY_KEY, PRESETS, TABLES
from .plan import Cell, CurvePoint


def write_results(
    out: Path, preset_name: str, recipe: str, cells: list[Cell], curves: list[CurvePoint]
) -> None:
    """``results.json`` and ``results.md`` (tables beside the paper's numbers), and the curves'
    figure when there are curve points."""
    preset = PRESETS[preset_name]
    atomic_write_json(out / "results.json", {
        "preset": preset_name, "recipe": recipe, "preset_settings": asdict(preset),
        "cells": [asdict(c) | {"excess": c.excess} for c in cells],
        "curves": [asdict(p) for p in curves],
    })  # fmt: skip
    atomic_write_text(out / "results.md", format_tables(preset_name, recipe, cells, curves))
    if curves:
        plot_curves(out, curves)


def format_tables(
    preset_name: str, recipe: str, cells: list[Cell], curves: list[CurvePoint] | None = None
) -> str:
    """The tables in markdown: per dataset and table, a row per method, a column per budget."""
    preset = PRESETS[preset_name]
    lookup = {(c.data, c.method, b): c for c in cells for b in c.budgets}
    lines = [
        f"Preset `{preset_name}` (recipe `{recipe}`): 1 unit = {preset.unit:,} steps; test NLL "
        f"in nats on {preset.n_test:,} held-out points, {preset.eval_solver.upper()} with "
        f"{preset.eval_steps} steps "
        "(the authors' SA row: 299), exact trace; ± one standard error. Each budget cell: NLL "
        "± s.e. [excess over the row's floor] (steps per network).",
        "",
    ]
    for data in preset.datasets:
        for tid, (title, keys) in TABLES.items():
            keys = [k for k in keys if k in preset.methods]
            if not keys:
                continue
            lines += [f"**{data.upper()} — {title}**", "",
                      "| method | paper | " + " | ".join(BUDGETS) + " | floor (own t0) |",
                      "|---|---|" + "---|" * len(BUDGETS) + "---|"]  # fmt: skip
            for k in keys:
                m = BY_KEY[k]
                paper = m.paper.get(tid, {}).get(data)
                row = [m.label, f"{paper:.2f}" if paper is not None else "-"]
                floor = math.nan
                for b in BUDGETS:
                    c = lookup.get((data, k, b))
                    if c is None or c.nll is None:
                        row.append("-")
                        continue
                    floor = c.floor
                    row.append(f"{c.nll:.3f} ± {c.stderr:.3f} [+{c.excess:.3f}] ({c.steps:,})")
                row.append("-" if math.isnan(floor) else f"{floor:.3f}")
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
    if curves:
        lines += ["**NLL against training compute** (SA-DPM and TPSM-10, VP, paper recipe; "
                  "wall-clock as measured on this shared machine, block-steps beside it)", "",
                  "| data | method | steps/block | block-steps | train s | NLL |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for p in curves:
            lines.append(f"| {p.data.upper()} | {BY_KEY[p.method].label} | {p.steps:,} | "
                         f"{p.block_steps:,} | {p.train_seconds:.0f} | "
                         f"{p.nll:.3f} ± {p.stderr:.3f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot_curves(out: Path, curves: list[CurvePoint]) -> None:
    """``nll_vs_compute.png``: NLL against block-steps, SA-DPM and TPSM-10, one panel per data
    set."""
    from ..viz import use_agg

    plt = use_agg()
    datasets = sorted({p.data for p in curves})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), dpi=120,
                             squeeze=False)  # fmt: skip
    for ax, data in zip(axes[0], datasets):
        for key, color in (("sa", "tab:blue"), ("tpsm10", "tab:orange")):
            pts = sorted((p for p in curves if p.data == data and p.method == key),
                         key=lambda p: p.block_steps)  # fmt: skip
            if not pts:
                continue
            ax.errorbar([p.block_steps for p in pts], [p.nll for p in pts],
                        yerr=[p.stderr for p in pts], marker="o", color=color, capsize=2,
                        label=BY_KEY[key].label)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("training compute (block-steps, all blocks)")
        ax.set_ylabel("test NLL (nats)")
        ax.set_title(data.upper())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "nll_vs_compute.png")
    plt.close(fig)


def figures(out: Path, cells: list[Cell], progress: bool) -> None:
    """Density heat maps of every method (its ``per-net`` run) beside the true density."""
    from ..core.ode import PLOT_SOLVER
    from ..runs.inference import load_model
    from ..viz.density import plot_density_comparison
    from ..viz.samples import data_extent

    for data in sorted({c.data for c in cells}):
        chosen = [c for c in cells if c.data == data and "equal per net" in c.budgets
                  and c.nll is not None]  # fmt: skip
        if not chosen:
            continue
        models = {BY_KEY[c.method].key: load_model(out / "runs" / c.run) for c in chosen}
        run = Run.open(out / "runs" / chosen[0].run)
        pts = run.dataset.test_set(20000, run.config.eval.test_seed)
        plot_density_comparison(
            models, run.dataset, out / f"density_{data}.png", extent=data_extent(pts),
            solver=PLOT_SOLVER, data_points=pts, progress=progress,
            title=f"{data.upper()}: ODE densities (RK4 100 steps), equal steps per network",
        )  # fmt: skip
