"""``psm reproduce``: the paper's 2D tables (1, 10, 11) trained and scored on this machine."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from ..errors import PSMError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="train and score every cell of the paper's 2D tables (TY, HG)",
        description="Train and score SA-DPM, TPSM_A/B/C, TPSM-10, DPSM (VP) and SA/TPSM-10 (flow "
        "matching) on TY and HG under three budgets (the paper's ratio, equal total compute, "
        "equal steps per network), beside the paper's numbers and each row's floor. Resumable: "
        "a second call reuses finished runs and evaluations.",
    )
    p.add_argument(
        "--preset", default="small",
        help="tiny (CI), small (< 30 min on 2 cores), full (docs/results.md), paper (the "
        "authors' step counts; days)",
    )  # fmt: skip
    p.add_argument(
        "--recipe", default="paper",
        help="training recipe: paper (default) or psm (docs/results.md's better recipe)",
    )  # fmt: skip
    p.add_argument("--out", help="folder (default: reproduce-<preset>, -<recipe> unless paper)")
    p.add_argument(
        "--data", help="only these data sets, e.g. ty (run one process per set on spare cores)"
    )
    p.add_argument(
        "--runs",
        help="only these runs, named as --plan lists them, e.g. hg_tpsm_c_8000 or tpsm_c_8000 "
        "(on every data set); a curve is named by data set and method, e.g. ty_sa",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=2, help="torch threads in all (default 2)")
    p.add_argument(
        "--processes", type=int,
        help="data sets trained side by side, one process each, sharing --threads (default: "
        "one per data set while there is a thread for each; small MLPs use one core better "
        "than two)",
    )  # fmt: skip
    p.add_argument(
        "--plan", action="store_true",
        help="list the runs, what each still needs and the hours left (trains nothing)",
    )  # fmt: skip
    p.add_argument(
        "--report", action="store_true",
        help="train and score nothing: write results.md/.json and the figures from what is "
        "already scored in --out (a preset stopped part way)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from ..experiments.catalogue import PRESETS, RECIPES
    from ..experiments.report import format_tables
    from ..experiments.reproduce import reproduce, started

    if args.preset not in PRESETS:
        raise PSMError(f"--preset {args.preset!r}: choose from {', '.join(PRESETS)}")
    if args.recipe not in RECIPES:
        raise PSMError(f"--recipe {args.recipe!r}: choose from {', '.join(RECIPES)}")
    if args.threads < 1:
        raise PSMError(f"--threads must be >= 1, got {args.threads}")
    suffix = "" if args.recipe == "paper" else f"-{args.recipe}"
    out = args.out or f"reproduce-{args.preset}{suffix}"
    datasets = None
    if args.data:
        datasets = tuple(d.strip() for d in args.data.split(",") if d.strip())
        bad = [d for d in datasets if d not in PRESETS[args.preset].datasets]
        if bad or not datasets:
            raise PSMError(f"--data {args.data!r}: choose from "
                           f"{', '.join(PRESETS[args.preset].datasets)}")  # fmt: skip
    runs, named = None, None
    if args.runs is not None:
        runs = tuple(r.strip() for r in args.runs.split(",") if r.strip())
        named = _named_per_data(args, out, datasets, runs)
        bad = [r for r in runs if not any(r in names for names in named.values())]
        if bad or not runs:
            raise PSMError(f"--runs {args.runs!r}: no such run in preset {args.preset} "
                           f"(psm reproduce --plan lists them)")  # fmt: skip
        datasets = tuple(d for d in named if named[d])
    start = time.perf_counter()
    todo = datasets or PRESETS[args.preset].datasets
    processes = args.processes or min(len(todo), args.threads)
    if processes < 1:
        raise PSMError(f"--processes must be >= 1, got {args.processes}")
    if args.plan:
        from ..experiments.plan import plan_report, plan_rows

        rows = plan_rows(out, args.preset, args.recipe, datasets, runs)
        print(plan_report(rows, processes))
        return 0
    if args.report and not started(out):
        raise PSMError(f"--report: nothing scored in {out} (run the preset first)")
    if processes > 1 and len(todo) > 1 and not args.report:
        _side_by_side(args, out, todo, processes, named)
    cells = reproduce(
        out, args.preset, recipe=args.recipe, threads=args.threads, datasets=datasets,
        progress=not args.no_progress, log=lambda line: print(line, file=sys.stderr),
        report_only=args.report, runs=runs,
    )  # fmt: skip
    print(format_tables(args.preset, args.recipe, cells))
    print(f"{out}/results.md written in {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return 0


def _named_per_data(
    args: argparse.Namespace, out: str, datasets: tuple[str, ...] | None, runs: tuple[str, ...]
) -> dict[str, list[str]]:
    """Data set → the names in ``runs`` that select one of its runs (the preset's order)."""
    from ..experiments.catalogue import PRESETS
    from ..experiments.plan import plan_rows, selected

    rows = plan_rows(out, args.preset, args.recipe, datasets)
    return {
        d: [r for r in runs if any(x.data == d and selected(x.run, d, (r,)) for x in rows)]
        for d in datasets or PRESETS[args.preset].datasets
    }


def _side_by_side(
    args: argparse.Namespace, out: str, datasets, processes: int, runs: dict | None
) -> None:
    """Train and score the data sets in ``processes`` child processes (``--threads`` shared),
    each a ``psm reproduce --data D`` (``--runs``: the names ``runs[D]``); the parent then only
    gathers the cells they scored."""
    threads = max(1, args.threads // processes)
    Path(out).mkdir(parents=True, exist_ok=True)
    pending = list(datasets)
    running: list[tuple[str, subprocess.Popen]] = []
    failed: list[str] = []
    while pending or running:
        while pending and len(running) < processes:
            data = pending.pop(0)
            cmd = [sys.executable, "-m", "psm.cli", "reproduce", "--preset", args.preset,
                   "--recipe", args.recipe, "--out", out, "--data", data,
                   "--threads", str(threads), "--processes", "1", "--no-progress"]  # fmt: skip
            if runs is not None:
                cmd += ["--runs", ",".join(runs[data])]
            print(f"{data}: one process, {threads} thread(s)", file=sys.stderr)
            running.append((data, subprocess.Popen(cmd, stdout=subprocess.DEVNULL)))
        time.sleep(0.5)
        for data, proc in list(running):
            if proc.poll() is not None:
                running.remove((data, proc))
                if proc.returncode != 0:
                    failed.append(data)
    if failed:
        raise PSMError(f"psm reproduce failed for {', '.join(failed)} (see the lines above)")
