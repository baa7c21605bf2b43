"""``psm demo``: the README's main job (SA-DPM vs TPSM on TY, local CPU, ~5 minutes)."""

from __future__ import annotations

import argparse
import sys

from ..errors import PSMError


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="SA-DPM vs TPSM-10 on TY with the same time budget (local CPU, ~5 min)",
        description="Train SA-DPM and TPSM (blocks stacked by the ensemble trainer) on TY for "
        "the same wall-clock time, then print test NLLs beside the true-entropy floor and "
        "write plots.",
    )
    p.add_argument("--out", default="psm-demo", help="demo folder (reused if it exists)")
    p.add_argument("--seconds", type=float, default=120.0, help="training seconds per method")
    p.add_argument("--blocks", type=int, default=10, help="TPSM blocks")
    p.add_argument("--data", default="ty", help="2D dataset (default: the paper's TY)")
    p.add_argument("--n-test", type=int, default=3000, help="test points for the NLL")
    p.add_argument("--steps", type=int, default=250, help="RK4 steps for the NLL")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads for both methods")
    p.add_argument("--grid", type=int, default=100, help="heat-map cells per axis (default 100)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..data import TOYS
    from ..experiments.demo import format_table, run_demo

    for flag in ("seconds", "blocks", "n_test", "steps", "threads", "grid"):
        if getattr(args, flag) <= 0:
            raise PSMError(f"--{flag.replace('_', '-')} must be > 0")
    if args.data not in TOYS:
        raise PSMError(f"--data: unknown 2D dataset {args.data!r} (choose from {', '.join(TOYS)})")
    print(
        f"psm demo: SA-DPM vs TPSM-{args.blocks} on {args.data.upper()}, {args.seconds:.0f} s "
        f"of training each on {args.threads} CPU thread(s); results in {args.out}/",
        file=sys.stderr,
    )
    rows = run_demo(
        args.out, seconds=args.seconds, blocks=args.blocks, data=args.data, n_test=args.n_test,
        steps=args.steps, seed=args.seed, threads=args.threads, progress=not args.no_progress,
        plots=not args.no_plots, grid=args.grid,
    )  # fmt: skip
    print(format_table(rows))
    for r in rows:
        for note in r.notes:
            print(f"psm: warning: {note}", file=sys.stderr)
    print(f"\nNLL: RK4 with {args.steps} steps on {args.n_test} test points; runs, plots and "
          f"results in {args.out}/", file=sys.stderr)  # fmt: skip
    return 0
