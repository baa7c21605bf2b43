"""``psm train CONFIG``: train every block (or ``--blocks``) of a run described by a YAML config.

Everything that can be checked is checked before the run directory is touched: the config, the
data source, the device, the executor and the block ids. ``--dry-run`` prints the resolved config
and the block plan after the same checks.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ..errors import PSMError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the blocks of a run",
        description="Train every block (or --blocks) of a run described by a YAML config.",
    )
    p.add_argument("config", help="YAML config, e.g. configs/toy/ty_tpsm10.yaml")
    p.add_argument("--blocks", help="block ids to train, e.g. 3,5-9 (default: all)")
    from ..executors import EXECUTORS
    from ..executors.flags import add_executor_arguments

    p.add_argument(
        "--executor",
        metavar="NAME",
        help=f"who runs the blocks: {', '.join(EXECUTORS.names())} (default: executor.name)",
    )
    add_executor_arguments(p)  # each executor's flags (--workers, --num-cpus, --slurm-*, ...)
    p.add_argument("--steps", type=int, help="override train.steps (per block)")
    p.add_argument(
        "--budget",
        metavar="TOTAL",
        help="let psm give each block its steps from measurements, within TOTAL block-steps "
        "(2000000) or wall-clock time (1h, 45m): sets train.budget.total (docs/auto.md)",
    )
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
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the config, the plan and the disk it will need, then exit",
    )
    p.add_argument(
        "--prune-done",
        action="store_true",
        help="keep only the final weights of each block as it finishes (train.keep_state=false; "
        "more steps later restart its optimizer)",
    )
    p.add_argument(
        "--reset-failed",
        action="store_true",
        help="discard the checkpoints, status and metrics of the run's failed blocks and train "
        "them anew; when no block holds training, the run also takes this config's settings "
        "(e.g. a lower train.lr after a non-finite loss)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="skip the loss-curve PNG")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from ..executors import EXECUTORS, make_executor
    from ..executors.flags import flag_values
    from ..runs.checkpoint import verify_checkpoints
    from ..runs.config import config_hash, load_config
    from ..runs.run import CONFIG_FILE, Run, parse_blocks
    from ..runs.run_parts import Parts
    from ..runs.wandb_log import check_wandb
    from ..training.train import train_device

    if args.workers is not None and args.workers < 1:
        raise PSMError(f"--workers must be >= 1, got {args.workers}")
    if args.steps is not None and args.steps < 1:
        raise PSMError(f"--steps must be >= 1, got {args.steps}")
    if args.executor is not None and args.executor not in EXECUTORS:
        raise PSMError(f"--executor {args.executor!r}: choose from {', '.join(EXECUTORS.names())}")
    if args.budget is not None and (args.blocks or args.steps is not None):
        raise PSMError("--budget chooses every block's steps: drop --blocks and --steps")
    if args.prune_done:
        args.overrides = [*args.overrides, "train.keep_state=false"]
    cfg = load_config(
        args.config, overrides=args.overrides, steps=args.steps, out=args.out, seed=args.seed,
        executor=args.executor, budget=args.budget,
    )  # fmt: skip
    if cfg.train.budget is not None and args.blocks:
        raise PSMError("train.budget chooses every block's steps: drop --blocks")
    executor = make_executor(cfg.executor.name, cfg, **flag_values(args))
    train_device(cfg.train.device)  # a device that is not here fails before anything is written
    check_wandb(cfg.train.wandb)  # so does train.wandb without wandb installed
    partition = cfg.partition.build()
    blocks = parse_blocks(args.blocks) if args.blocks else list(range(partition.num_blocks))
    bad = [b for b in blocks if not 0 <= b < partition.num_blocks]
    if bad:
        raise PSMError(
            f"--blocks: block(s) {', '.join(map(str, bad))} out of range 0-"
            f"{partition.num_blocks - 1}"
        )
    parts = Parts(cfg)
    parts.check()  # a bad data source or a net that cannot take it fails before any write
    if cfg.train.init_from is not None and cfg.partition.kind != "auto":
        from ..runs.warm_start import check_config

        cfg = check_config(cfg, parts)  # so does a warm-start source that cannot be used
    if args.dry_run:
        _print_plan(cfg, config_hash(cfg), blocks, executor.describe())
        _print_cost(cfg, parts, blocks)
        _print_disk(cfg, parts, blocks)
        return 0
    spent = (0, 0.0)
    if cfg.partition.kind == "auto":
        if args.blocks:
            raise PSMError("partition.kind auto chooses the blocks: drop --blocks")
        from ..auto.splits import choose_splits, resolve

        choice = choose_splits(cfg, executor, log=lambda line: print(line, file=sys.stderr))
        cfg = resolve(cfg, choice)
        parts = Parts(cfg)
        spent = (choice.pilot_steps, choice.seconds)  # the pilot's share of a budget
    if cfg.train.budget is not None and cfg.train.budget.candidates:
        from ..auto.nets import choose_nets, resolve_nets

        race = choose_nets(cfg, executor, log=lambda line: print(line, file=sys.stderr))
        cfg = resolve_nets(cfg, race)
        parts = Parts(cfg)
        spent = (spent[0] + race.block_steps, spent[1] + race.seconds)  # its share of a budget
    if cfg.train.budget is not None:
        return _train_budget(cfg, executor, parts, blocks, args, spent)
    if (cfg.out_dir / CONFIG_FILE).exists():
        old = Run.open(cfg.out_dir)
        if args.reset_failed:
            _reset_failed(old, cfg)
            old = Run.open(cfg.out_dir)
        if old.hash_of(cfg) == old.hash:  # reuse: check its checkpoints before touching it
            verify_checkpoints(old, blocks)
    run = Run.create(cfg, parts=parts)
    todo = run.ledger.not_done(blocks, invocation=True)
    print(
        f"run {run.path} ({run.hash}): {len(blocks)} block(s), {len(todo)} to train, "
        f"{_steps_phrase(run)}; {executor.describe()}",
        file=sys.stderr,
    )
    from ..executors.monitor import ProgressMonitor

    t0 = time.perf_counter()
    with ProgressMonitor(run, blocks, enabled=not args.no_progress and bool(todo)):
        outcomes = executor.run(run, todo) if todo else []
    wall = time.perf_counter() - t0
    if not args.no_plot:
        from ..viz.losses import plot_loss_curves

        try:
            png = plot_loss_curves(run)
            print(f"loss curves: {png}", file=sys.stderr)
        except PSMError as e:
            print(f"psm: warning: no loss plot: {e}", file=sys.stderr)
    return _report_outcomes(run, outcomes, blocks, wall)


def _train_budget(
    cfg, executor, parts, blocks: list[int], args: argparse.Namespace, spent: tuple[int, float]
) -> int:
    """``train.budget``: rounds of the plan (:mod:`psm.auto.budget`), each through the
    executor; the plan's lines on stderr."""
    from ..auto.budget import train_budget

    print(f"run {cfg.out_dir}: budget {cfg.train.budget.total}; {executor.describe()}",
          file=sys.stderr)  # fmt: skip
    t0 = time.perf_counter()
    run, outcomes = train_budget(
        cfg, executor, parts=parts, log=lambda line: print(line, file=sys.stderr),
        spent_before=spent[0], seconds_before=spent[1],
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if not args.no_plot:
        from ..viz.budget import plot_budget
        from ..viz.losses import plot_loss_curves

        try:
            print(f"loss curves: {plot_loss_curves(run)}", file=sys.stderr)
            print(f"budget plan: {plot_budget(run)}", file=sys.stderr)
        except PSMError as e:
            print(f"psm: warning: no plot: {e}", file=sys.stderr)
    return _report_outcomes(run, outcomes, blocks, wall)


def _reset_failed(run, cfg) -> None:
    """``--reset-failed``: discard the failed blocks (and, if no block holds training, take the
    new config); say what was discarded."""
    failed = run.ledger.failed()
    if run.hash_of(cfg) != run.hash:
        run.replace_config(cfg)
        what = f"failed block(s) {_ranges(failed)}" if failed else "no trained block"
        print(
            f"psm: reset {run.path}: discarded {what}; the run takes the new config",
            file=sys.stderr,
        )
        return
    if failed:
        run.ledger.reset(failed)
        print(
            f"psm: reset block(s) {_ranges(failed)}: discarded their checkpoints, status and "
            "metrics; they train anew",
            file=sys.stderr,
        )


def failure_line(run, failed: Sequence) -> str:
    """One line for the blocks that failed: the blocks (summarised), the cause, the remedy."""
    causes: dict[str, list] = {}
    for o in failed:
        causes.setdefault(_kind(_cause(o.error)), []).append(o)
    blocks = _ranges([o.block for o in failed])
    noun = "blocks" if len(failed) > 1 else "block"
    kind, group = max(causes.items(), key=lambda kv: len(kv[1]))
    first = _cause(group[0].error)
    line = f"{noun} {blocks} failed: {first}"
    blocks_here = [o.block for o in group]
    if len(group) > 1 and any(_cause(o.error) != first for o in group):
        line += f" (block {group[0].block}; the others alike)"
    if len(causes) > 1:
        line += f"; block(s) {_ranges([o.block for o in failed if o.block not in blocks_here])}"
        line += " failed otherwise"
    if kind.startswith("non-finite loss"):
        line += (
            "; lower train.lr (or check the data) and run again with --reset-failed, which "
            "discards the failed blocks' checkpoints"
        )
    return f"{line}; psm status {run.path} shows each block"


def _cause(error: str | None) -> str:
    """A block's error without its ``block N:`` prefix."""
    import re

    return re.sub(r"^block \d+: ", "", error or "unknown error")


def _kind(cause: str) -> str:
    """The cause with its paths and numbers taken out, so that blocks failing alike (at other
    steps, on other files) group together."""
    import re

    cause = re.sub(r"\S*/\S*?(?=:|\s|$)", "<path>", cause)
    return re.sub(r"[-+]?\d[\d.e+-]*|nan|inf", "#", cause)


def _steps_phrase(run) -> str:
    """``"20000 steps each"``, or the per-block targets of ``train.block_steps``."""
    given = run.config.train.block_steps
    if given is None:
        return f"{run.config.train.steps} steps each"
    return "steps per block " + ", ".join(str(s) for s in given)


def _report_outcomes(run, outcomes, blocks, wall: float) -> int:
    by_state: dict[str, list[int]] = {}
    for o in outcomes:
        by_state.setdefault(o.state, []).append(o.block)
    failed = [o for o in outcomes if o.state == "failed"]
    done = sum(run.ledger.done(b, run.config.step_target(b)) for b in blocks)
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
    if failed:
        print(f"psm: error: {failure_line(run, failed)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


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

    from ..runs.run import CONFIG_FILE, Run

    print(yaml.safe_dump({"config_hash": h, **cfg.model_dump(mode="json")}, sort_keys=False))
    partition = cfg.partition.build()
    exists = (cfg.out_dir / CONFIG_FILE).exists()
    run = Run.open(cfg.out_dir) if exists else None
    print(f"# plan: {len(blocks)} of {partition.num_blocks} block(s) -> {cfg.out_dir}")
    print(f"# executor: {executor}")
    if cfg.partition.kind == "auto":
        from ..auto.splits import pilot_steps_of

        print(
            f"# partition: auto - a {pilot_steps_of(cfg)}-step SA-DPM pilot places "
            f"the splits when training starts ({cfg.out_dir}-pilot); the spans below are "
            "placeholders"
        )
    if cfg.train.budget is not None:
        print(
            f"# budget: {cfg.train.budget.total} - psm gives each block its steps from the "
            "held-out signal (docs/auto.md); the steps below are not used"
        )
        if cfg.train.budget.candidates:
            from ..auto.nets import race_steps_of

            print(
                f"# nets: a race of {len(cfg.train.budget.candidates)} candidates, "
                f"{race_steps_of(cfg)} steps per block each ({cfg.out_dir}-race), chooses each "
                "block's net and objective when training starts"
            )
    print(f"{'block':>5}  {'span':<20} {'train t':<24} {'steps':>8}  {'status':<10}")
    for b in blocks:
        lo, hi = partition.train_range(b)
        span = f"U[{lo:.4g}, {hi:.4g}]" if hi > lo else f"t = {lo:.4g}"
        state = "-"
        if run is not None and run.hash_of(cfg) == run.hash:
            st = run.ledger.status(b)
            state = f"{st.state} {st.step}"
        elif run is not None:
            state = "other cfg"
        steps = cfg.step_target(b)
        print(f"{b:>5}  {partition.describe(b):<20} {span:<24} {steps:>8}  {state:<10}")


def _print_cost(cfg, parts, blocks: list[int]) -> None:
    """Parameters and FLOPs per net (``--dry-run``; :mod:`psm.runs.cost`), so that runs with
    per-block nets (``blocks:``) are compared at equal compute."""
    from ..runs.cost import block_costs, format_count, training_flops

    if not blocks:
        return
    try:
        costs = block_costs(cfg, parts, blocks)
    except (RuntimeError, NotImplementedError, TypeError):  # a net the meta device cannot run
        return
    groups: dict[tuple[int, int], list[int]] = {}
    for b in blocks:
        groups.setdefault((costs[b].params, costs[b].forward_flops), []).append(b)
    for (params, fwd), bs in groups.items():
        name = cfg.net_for(bs[0]).name
        which = _ranges(bs)
        print(f"# net of block(s) {which}: {name}, {format_count(params)} parameters, "
              f"{format_count(fwd)} FLOPs per sample forward")  # fmt: skip
    objectives: dict[str, list[int]] = {}
    for b in blocks:
        spec = cfg.objective_for(b)
        pred = spec.block_process(parts.process).prediction
        extra = {k: v for k, v in spec.model_dump(mode="json").items()
                 if k not in ("name", "prediction")}  # fmt: skip
        label = spec.name + "".join(f", {k} {v}" for k, v in extra.items()) + f", predicts {pred}"
        objectives.setdefault(label, []).append(b)
    if len(objectives) > 1 or cfg.blocks:
        for label, bs in objectives.items():
            print(f"# objective of block(s) {_ranges(bs)}: {label}")
    total = sum(training_flops(cfg, costs[b], b) for b in blocks)
    note = " (the budget's plan: at train.steps)" if cfg.train.budget is not None else ""
    print(f"# training compute: {format_count(total)} FLOPs for {len(blocks)} block(s){note}")


def _ranges(blocks: list[int]) -> str:
    """``0, 2-5, 7`` from sorted block ids."""
    out, start = [], blocks[0]
    for prev, b in zip(blocks, [*blocks[1:], None]):
        if b is None or b != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = b
    return ", ".join(out)


def _print_disk(cfg, parts, blocks: list[int]) -> None:
    """The disk the blocks will take (``--dry-run``): each block's files, predicted from the
    net's tensors (:func:`psm.runs.prune.predict_disk`), the total with the resume states and
    after pruning them."""
    from ..runs.prune import format_bytes, predict_disk

    disk = predict_disk(cfg, parts, blocks)
    if not disk:
        return
    fb = format_bytes
    w, s = max(d.weights for d in disk), max(d.state for d in disk)
    logs = sum(d.logs for d in disk) / len(disk)
    held = "weights, Adam moments, EMA, RNG" if cfg.train.ema else "weights, Adam moments, RNG"
    print(
        f"# disk per block: weights {fb(w)}, resume state {fb(s)} ({held}), metrics and logs "
        f"~{fb(logs)}"
    )
    total, pruned = sum(d.total for d in disk), sum(d.pruned for d in disk)
    keep = cfg.train.keep_state
    print(
        f"# disk for {len(disk)} block(s): {fb(total)} with their resume states"
        f"{'' if keep else ' (not kept: train.keep_state false)'}, {fb(pruned)} after pruning "
        f"them ({'as each block finishes' if not keep else 'psm prune, or --prune-done'})"
    )
    extra = f"{fb(s)} more" if keep else f"up to 2 x {fb(s)}"
    print(
        f"# disk while training: {extra} per block being trained at once (a checkpoint writes "
        "the new resume state beside the old one, then replaces it)"
    )
    if cfg.train.budget is not None:
        print("# disk: metrics follow the budget's steps, not known yet (sizes at train.steps)")
