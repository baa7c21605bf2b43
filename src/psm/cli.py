"""The ``psm`` command line.

Bad input (config, run directory, checkpoint, data) is reported as one line on stderr with exit
code 2, and nothing on disk is overwritten. Ctrl-C stops training with a checkpoint at the
current step (exit code 130); the same command resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence

from .errors import PSMError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

Command = Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the blocks of a run",
        description="Train every block (or --blocks) of a run described by a YAML config.",
    )
    p.add_argument("config", help="YAML config, e.g. configs/toy/ty_tpsm10.yaml")
    p.add_argument("--blocks", help="block ids to train, e.g. 3,5-9 (default: all)")
    p.add_argument(
        "--executor",
        choices=["local", "ensemble", "ray", "slurm"],
        help="who runs the blocks (default: the config's executor.name)",
    )
    p.add_argument("--workers", type=int, help="worker processes (local, ensemble)")
    p.add_argument("--max-stack", type=int, help="ensemble: most blocks stacked at once")
    p.add_argument("--steps", type=int, help="override train.steps (per block)")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field (repeatable)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the config and plan, then exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")
    from .executors.options import add_cluster_arguments

    add_cluster_arguments(p)
    p.set_defaults(func=cmd_train)


def _executor_options(args: argparse.Namespace) -> dict:
    from .executors.options import cluster_options

    opts = {"workers": args.workers, "max_stack": args.max_stack}
    opts |= cluster_options(args)
    return {k: v for k, v in opts.items() if v is not None}


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import verify_checkpoints
    from .config import config_hash, load_config
    from .executors import make_executor
    from .run import CONFIG_FILE, Run, parse_blocks

    if args.workers is not None and args.workers < 1:
        raise PSMError(f"--workers must be >= 1, got {args.workers}")
    if args.steps is not None and args.steps < 1:
        raise PSMError(f"--steps must be >= 1, got {args.steps}")
    cfg = load_config(
        args.config, overrides=args.overrides, steps=args.steps, out=args.out, seed=args.seed
    )
    name = args.executor or cfg.executor.name
    executor = make_executor(name, cfg, **_executor_options(args))
    partition = cfg.build_partition()
    blocks = parse_blocks(args.blocks) if args.blocks else list(range(partition.num_blocks))
    bad = [b for b in blocks if not 0 <= b < partition.num_blocks]
    if bad:
        raise PSMError(
            f"--blocks: block(s) {', '.join(map(str, bad))} out of range 0-"
            f"{partition.num_blocks - 1}"
        )
    cfg.build_dataset()  # a bad data source fails here, before anything is written
    if args.dry_run:
        _print_plan(cfg, config_hash(cfg), blocks, executor.describe())
        return 0
    if (cfg.out_dir / CONFIG_FILE).exists():
        old = Run.open(cfg.out_dir)
        if old.hash == config_hash(cfg):  # reuse: check its checkpoints before touching it
            verify_checkpoints(old, blocks)
    run = Run.create(cfg)
    todo = run.unfinished(blocks)
    print(
        f"run {run.path} ({run.hash}): {len(blocks)} block(s), {len(todo)} to train, "
        f"{run.target_steps} steps each; {executor.describe()}",
        file=sys.stderr,
    )
    from .executors.monitor import ProgressMonitor

    t0 = time.perf_counter()
    with ProgressMonitor(run, blocks, enabled=not args.no_progress and bool(todo)):
        outcomes = executor.run(run, todo) if todo else []
    wall = time.perf_counter() - t0
    if not args.no_plot:
        from .viz.losses import plot_loss_curves

        try:
            png = plot_loss_curves(run)
            print(f"loss curves: {png}", file=sys.stderr)
        except PSMError as e:
            print(f"psm: warning: no loss plot: {e}", file=sys.stderr)
    return _report_outcomes(run, outcomes, blocks, wall)


def _report_outcomes(run, outcomes, blocks, wall: float) -> int:
    by_state: dict[str, list[int]] = {}
    for o in outcomes:
        by_state.setdefault(o.state, []).append(o.block)
    for o in outcomes:
        if o.state == "failed":
            print(f"psm: block {o.block} failed: {o.error}", file=sys.stderr)
    done = sum(run.is_done(b) for b in blocks)
    parts = [f"{len(v)} {k}" for k, v in sorted(by_state.items())]
    print(
        f"{done}/{len(blocks)} block(s) done ({', '.join(parts) or 'nothing to do'}) "
        f"in {wall:.1f}s; see: psm status {run.path}",
        file=sys.stderr,
    )
    if "interrupted" in by_state:
        print("psm: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if "locked" in by_state:
        print(
            f"psm: block(s) {_ranges(by_state['locked'])} are being trained by another worker",
            file=sys.stderr,
        )
    return 1 if "failed" in by_state else 0


def _ranges(ids: Sequence[int]) -> str:
    ids = sorted(ids)
    out, start = [], None
    for i, b in enumerate(ids):
        if start is None:
            start = b
        if i + 1 == len(ids) or ids[i + 1] != b + 1:
            out.append(str(start) if start == b else f"{start}-{b}")
            start = None
    return ",".join(out)


def _print_plan(cfg, h: str, blocks: list[int], executor: str) -> None:
    import yaml

    from .run import CONFIG_FILE, Run

    print(yaml.safe_dump({"config_hash": h, **cfg.model_dump(mode="json")}, sort_keys=False))
    partition = cfg.build_partition()
    process = cfg.build_process()
    exists = (cfg.out_dir / CONFIG_FILE).exists()
    run = Run.open(cfg.out_dir) if exists else None
    print(f"# plan: {len(blocks)} of {partition.num_blocks} block(s) -> {cfg.out_dir}")
    print(f"# executor: {executor}; {cfg.train.steps} steps per block")
    print(f"{'block':>5}  {'span':<20} {'train t':<24} {'status':<10}")
    for b in blocks:
        lo, hi = partition.train_range(b, process.t0)
        span = f"U[{lo:.4g}, {hi:.4g}]" if hi > lo else f"t = {lo:.4g}"
        state = "-"
        if run is not None and run.hash == h:
            st = run.block_status(b)
            state = f"{st.state} {st.step}"
        elif run is not None:
            state = "other cfg"
        print(f"{b:>5}  {partition.describe(b):<20} {span:<24} {state:<10}")


# --------------------------------------------------------------------------- status
def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show the state of every block of a run")
    p.add_argument("run", help="run directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)


def _fmt_time(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def cmd_status(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .run import Run

    run = Run.open(args.run)
    statuses = run.statuses()
    extra = _cluster_states(run)
    if args.json:
        rows = [asdict(s) | ({"job_state": extra.get(s.block)} if extra else {}) for s in statuses]
        print(json.dumps({"run": str(run.path), "hash": run.hash, "blocks": rows}, indent=1))
        return 0
    cfg = run.config
    print(
        f"run {run.path}  config {run.hash}  data {cfg.data.name}  process {cfg.process.name}  "
        f"{run.partition.kind} x{run.num_blocks}  net {cfg.net.name}"
    )
    now = time.time()
    head = f"{'block':>5}  {'interval':<18} {'state':<8} {'steps':>17}  {'last loss':>10}  "
    head += f"{'wall':>8}  {'checkpoint':>14}"
    if extra:
        head += f"  {'job':<12}"
    print(head)
    for s in statuses:
        loss = f"{s.last_loss:.5f}" if s.last_loss is not None else "-"
        ck = "-"
        if s.checkpoint_time:
            ck = f"{s.checkpoint_step} ({_ago(now - s.checkpoint_time)})"
        line = f"{s.block:>5}  {s.span:<18} {s.state:<8} {s.step:>8}/{s.target:<8}  {loss:>10}  "
        line += f"{_fmt_time(s.wall_time):>8}  {ck:>14}"
        if extra:
            line += f"  {extra.get(s.block, '-'):<12}"
        print(line)
        if s.state == "failed" and s.error:
            print(f"{'':>7}{s.error}")
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    print("; ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _cluster_states(run) -> dict[int, str]:
    """Scheduler job states per block, where an executor recorded jobs (e.g. SLURM)."""
    from .executors.options import job_states

    return job_states(run)


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psm",
        description="Parallel Score Matching: train diffusion models as independent time "
        "blocks, then sample and score them as one model.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"psm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_status(sub)
    from .commands import add_commands

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``psm`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PSMError as e:
        print(f"psm: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("psm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
