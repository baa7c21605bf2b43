"""``psm prune RUN``: delete the resume points of a run's done blocks, keeping their final
weights (what ``psm nll``, ``sample`` and ``score`` read).

A done block's resume point (weights, Adam moments, EMA, RNG states) is needed only to train
it further; without it, more steps later restart the block from its final weights with a
fresh optimizer. Unfinished blocks are never touched, and the command refuses while one of the
blocks is being trained (:mod:`psm.runs.prune`).
"""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="delete the resume state of a run's done blocks (keeps their final weights)",
        description="Delete the resume state (weights, Adam moments, EMA) of a run's done "
        "blocks, keeping their final weights; unfinished blocks are left as they are. Training "
        "a pruned block further later restarts its optimizer from its final weights.",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--blocks", help="block ids to prune, e.g. 0-49 (default: all done blocks)")
    p.add_argument("--dry-run", action="store_true", help="say what would be freed; delete nothing")
    p.set_defaults(func=cmd_prune)


def cmd_prune(args: argparse.Namespace) -> int:
    from ..runs.prune import format_bytes, prune_run, restart_phrase
    from ..runs.run import Run, parse_blocks
    from .train import _ranges

    run = Run.open(args.run)
    blocks = parse_blocks(args.blocks) if args.blocks else None  # bad ids: one line
    report = prune_run(run, blocks, dry_run=args.dry_run)
    verb = "would free" if args.dry_run else "freed"
    if report.freed:
        pruned = sorted(report.freed)
        sizes = set(report.freed.values())
        each = f" ({format_bytes(sizes.pop())} each)" if len(sizes) == 1 and len(pruned) > 1 else ""
        print(
            f"{'dry run: ' if args.dry_run else ''}{verb} {format_bytes(report.total)}{each}: the "
            f"resume state of done block(s) {_ranges(pruned)} of {run.path}; their final weights "
            "stay"
        )
    else:
        print(f"nothing to prune in {run.path}: no done block with a resume state")
    if report.already:
        print(f"block(s) {_ranges(report.already)}: pruned before")
    if report.unfinished:
        print(f"kept block(s) {_ranges(report.unfinished)}: not done (their resume state stays)")
    if report.freed or report.already:
        print(
            "note: training a pruned block further (more steps) continues from its final "
            f"weights with {restart_phrase(run.config)}, not where its optimizer stopped"
        )
    return 0
