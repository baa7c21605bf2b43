"""``psm kl RUN``: where a trained run's error lies in time, block by block.

Data with an exact noised density (the 2D mixtures) give the exact score at every t, so the
score-matching KL bound splits into one term per block (:mod:`psm.core.block_kl`). The table says
which blocks hold the likelihood gap: the ones to give more steps (``train.block_steps``), more
blocks, or a better net.
"""

from __future__ import annotations

import argparse
import json

from ..errors import PSMError
from .model_flags import check_positive


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kl",
        help="the KL bound split by block, with the exact score of 2D mixture data",
        description="Each block's term of the score-matching KL bound (nats), from the exact "
        "score of the run's data (2D mixtures): where the likelihood gap lies in time.",
    )
    p.add_argument("run", help="run directory (every block trained)")
    p.add_argument("--points", type=int, default=2000, help="points per time node (2000)")
    p.add_argument("--times", type=int, default=16, help="time nodes per block (16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the points and noise (0)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_kl)


def cmd_kl(args: argparse.Namespace) -> int:
    check_positive(points=args.points, times=args.times, threads=args.threads)
    if args.points < 2:
        raise PSMError(f"--points must be >= 2, got {args.points}")
    import math

    import torch

    from ..core.block_kl import block_kl
    from ..data.base import ExactDensity
    from ..runs.inference import load_model
    from ..runs.run import Run

    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run.open(args.run)
    run.check_data()
    data = run.parts.dataset
    if not isinstance(data, ExactDensity):
        raise PSMError(
            f"psm kl needs data with an exact noised density (the 2D mixtures ty, hg, ...); "
            f"run {run.path} uses {run.config.data.name}"
        )
    model = load_model(run)
    gen = torch.Generator().manual_seed(args.seed)
    rows = block_kl(model, data.sample, data.marginal_score, points=args.points, times=args.times,
                    generator=gen)  # fmt: skip
    total = sum(r.kl for r in rows)
    total_se = math.sqrt(sum(r.stderr**2 for r in rows))
    if args.json:
        print(json.dumps({
            "run": str(run.path), "points": args.points, "times": args.times, "seed": args.seed,
            "total": total, "total_stderr": total_se,
            "blocks": [{"block": r.block, "t_lo": r.t_lo, "t_hi": r.t_hi, "kl": r.kl,
                        "stderr": r.stderr} for r in rows],
        }, indent=1))  # fmt: skip
        return 0
    print(
        f"run {run.path}: KL bound by block, nats (exact score of {run.config.data.name}; "
        f"{args.points} points x {args.times} times per block)"
    )
    print(f"{'block':>5}  {'interval':<22} {'KL':>9} {'± s.e.':>8} {'share':>6}")
    for r in rows:
        share = r.kl / total if total > 0 else float("nan")
        span = f"[{r.t_lo:.4g}, {r.t_hi:.4g}]"
        print(f"{r.block:>5}  {span:<22} {r.kl:9.4f} {r.stderr:8.4f} {share:6.2f}")
    print(f"{'total':>5}  {'':<22} {total:9.4f} {total_se:8.4f}")
    return 0
