"""``psm kl RUN``: where a trained run's error lies in time, block by block.

Data with an exact noised density (the 2D mixtures) give the exact score at every t, so the
score-matching KL bound splits into one term per block (:mod:`psm.core.block_kl`). The table says
which blocks hold the likelihood gap: the ones to give more steps (``train.block_steps``), more
blocks, or a better net.

Any other data (and mixtures with ``--estimate``) get the held-out denoising bound per block
(:mod:`psm.core.heldout`): the same term with the conditional score ``−ε/σ_t`` in place of the
exact one, which is the KL term **up to a constant** that does not depend on the network. Its
values compare the same block across checkpoints (their differences are differences of the
bound), not blocks with one another.
"""

from __future__ import annotations

import argparse
import json

from ..errors import PSMError
from .model_flags import check_positive


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kl",
        help="the KL bound split by block (exact for 2D mixtures, else up to a constant)",
        description="Each block's term of the score-matching KL bound (nats): from the exact "
        "score of the run's data for 2D mixtures; for any other data (or with --estimate) the "
        "held-out denoising bound, the same term up to a constant that does not depend on the "
        "network.",
    )
    p.add_argument("run", help="run directory (every block trained)")
    p.add_argument("--points", type=int, default=2000, help="points per time node (2000)")
    p.add_argument("--times", type=int, default=16, help="time nodes per block (16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the points and noise (0)")
    p.add_argument(
        "--estimate",
        action="store_true",
        help="the held-out denoising bound (up to a constant) even where the exact score is "
        "known: points x times held-out triples per block, one time per stratum of log t",
    )
    p.add_argument(
        "--blocks",
        help="only these blocks, e.g. 0 or 0,2-3 (they must be done; the others may not be)",
    )
    p.add_argument(
        "--zero",
        action="store_true",
        help="beside each block, the same term for a net that outputs ε = 0 on the same "
        "points (what a block that learned nothing scores; exact score only)",
    )
    p.add_argument(
        "--ode",
        action="store_true",
        help="each block's KL through the probability-flow ODE instead (what psm nll measures; "
        "the bound is the SDE's): the block's own field between the exact densities at its two "
        "ends, on --points fresh points per block (2D mixtures)",
    )
    p.add_argument(
        "--steps", type=int,
        help="--ode: RK4 steps over [t0, 1], split among the blocks as psm nll splits them "
        "(default: the run's eval.steps)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu", help="where the nets run (cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_kl)


def blocks_of(text: str, k: int) -> list[int]:
    """``--blocks`` as ids (:func:`psm.runs.run.parse_blocks`), each within the run's 0..k-1."""
    from ..runs.run import parse_blocks

    out = parse_blocks(text)
    if any(not 0 <= b < k for b in out):
        raise PSMError(f"--blocks {text!r}: the run has blocks 0-{k - 1}")
    return out


def zero_model(model):
    """``model`` with every block replaced by one whose ε is 0 (in the process's prediction)."""
    from ..core.model import BlockModel

    process = model.process

    def zero(x, t):
        return process.from_epsilon(x.new_zeros(x.shape), x, t)

    return BlockModel(process, model.partition, [zero] * model.num_blocks, shape=model.shape)


def cmd_kl(args: argparse.Namespace) -> int:
    check_positive(points=args.points, times=args.times, threads=args.threads)
    if args.points < 2:
        raise PSMError(f"--points must be >= 2, got {args.points}")
    import math

    import torch

    from ..core.block_kl import block_kl
    from ..core.device import resolve_device
    from ..core.heldout import HELDOUT_SEED, heldout_estimate
    from ..data.base import ExactDensity
    from ..runs.inference import load_model
    from ..runs.run import Run

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    run = Run.open(args.run)
    run.check_data()
    data = run.parts.dataset
    exact = isinstance(data, ExactDensity) and not args.estimate
    blocks = blocks_of(args.blocks, run.num_blocks) if args.blocks else None
    if args.zero and not exact:
        raise PSMError("--zero needs the exact score (2D mixtures, without --estimate)")
    if args.ode:
        if not exact:
            raise PSMError("--ode needs the exact densities (2D mixtures, without --estimate)")
        if args.zero:
            raise PSMError("--ode and --zero: choose one")
        return _ode_kl(args, run, data, blocks_of(args.blocks, run.num_blocks)
                       if args.blocks else None)  # fmt: skip
    if blocks is not None and not exact:
        raise PSMError("--blocks goes with the exact score (2D mixtures, without --estimate)")
    gen = torch.Generator().manual_seed(args.seed)
    zero_rows = None
    if exact:
        model = load_model(run, blocks=blocks)  # block_kl evaluates on the CPU
        kw = dict(points=args.points, times=args.times, blocks=blocks)
        rows = block_kl(model, data.sample, data.marginal_score, generator=gen, **kw)
        if args.zero:
            zero = zero_model(model)
            paired = torch.Generator().manual_seed(args.seed)  # the same draws as the model's
            zero_rows = block_kl(zero, data.sample, data.marginal_score, generator=paired, **kw)
        n = args.points * args.times
        what = (f"KL bound by block, nats (exact score of {run.config.data.name}; "
                f"{args.points} points x {args.times} times per block)")  # fmt: skip
    else:
        model = load_model(run, device=device)
        x0 = data.test_set(args.points * args.times, seed=HELDOUT_SEED + args.seed)
        n = int(x0.shape[0])
        if n < 2:
            raise PSMError(f"run {run.path}: the data have {n} held-out point(s); need 2")
        rows = heldout_estimate(model, x0, generator=gen, device=device)
        what = (f"KL bound by block, nats, up to a constant (held-out denoising bound; {n} "
                f"held-out points and times per block)")  # fmt: skip
    total = sum(r.kl for r in rows)
    total_se = math.sqrt(sum(r.stderr**2 for r in rows))
    kind = "exact" if exact else "estimate"
    if args.json:
        print(json.dumps({
            "run": str(run.path), "kind": kind, "up_to_constant": not exact,
            "points": args.points, "times": args.times, "held_out": None if exact else n,
            "seed": args.seed, "total": total, "total_stderr": total_se,
            "blocks": [{"block": r.block, "t_lo": r.t_lo, "t_hi": r.t_hi, "kl": r.kl,
                        "stderr": r.stderr}
                       | ({} if zero_rows is None else {"zero_net": z.kl, "zero_stderr": z.stderr})
                       for r, z in zip(rows, zero_rows or rows)],
        }, indent=1))  # fmt: skip
        return 0
    print(f"run {run.path}: {what}")
    label = "KL" if exact else "KL + C"
    head = f"{'block':>5}  {'interval':<22} {label:>9} {'± s.e.':>8} {'share':>6}"
    print(head + (f" {'zero net':>9} {'/ zero':>7}" if zero_rows else ""))
    for r, z in zip(rows, zero_rows or [None] * len(rows)):
        share = r.kl / total if exact and total > 0 else float("nan")
        span = f"[{r.t_lo:.4g}, {r.t_hi:.4g}]"
        sh = f"{share:6.2f}" if exact else f"{'-':>6}"
        tail = "" if z is None else f" {z.kl:9.4f} {r.kl / z.kl if z.kl > 0 else float('nan'):7.3f}"
        print(f"{r.block:>5}  {span:<22} {r.kl:9.4f} {r.stderr:8.4f} {sh}{tail}")
    print(f"{'total':>5}  {'':<22} {total:9.4f} {total_se:8.4f}")
    if not exact:
        print(
            "up to a constant (held-out denoising bound): each value is the block's KL term plus "
            "a constant C_b that does not depend on the network; compare a block across "
            "checkpoints, not blocks with one another"
        )
    return 0


def _ode_kl(args: argparse.Namespace, run, data, blocks: list[int] | None) -> int:
    """``psm kl --ode``: each block's KL through the probability-flow ODE
    (:mod:`psm.core.block_ode`)."""
    import math

    import torch

    from ..core.block_ode import block_ode_kl, prior_kl
    from ..core.ode import SolverSettings
    from ..runs.inference import load_model

    steps = args.steps or run.config.eval.steps
    check_positive(steps=steps)
    model = load_model(run, blocks=blocks)
    gen = torch.Generator().manual_seed(args.seed)
    solver = SolverSettings("rk4", steps=steps)
    rows = block_ode_kl(model, data.sample, data.marginal_log_prob, points=args.points,
                        solver=solver, generator=gen, blocks=blocks)  # fmt: skip
    prior, prior_se = prior_kl(model, data.sample, data.marginal_log_prob, points=args.points,
                               generator=gen)  # fmt: skip
    total = sum(r.kl for r in rows) + prior
    total_se = math.sqrt(sum(r.stderr**2 for r in rows) + prior_se**2)
    if args.json:
        print(json.dumps({
            "run": str(run.path), "kind": "ode", "points": args.points, "steps": steps,
            "seed": args.seed, "prior": prior, "prior_stderr": prior_se, "total": total,
            "total_stderr": total_se,
            "blocks": [{"block": r.block, "t_lo": r.t_lo, "t_hi": r.t_hi, "kl": r.kl,
                        "stderr": r.stderr} for r in rows],
        }, indent=1))  # fmt: skip
        return 0
    print(
        f"run {run.path}: KL through the probability-flow ODE by block, nats (each block's own "
        f"field between the exact densities of {run.config.data.name} at its ends; "
        f"{args.points} points per block, RK4 {steps} steps over [t0, 1])"
    )
    print(f"{'block':>5}  {'interval':<22} {'KL':>9} {'± s.e.':>8}")
    for r in rows:
        print(f"{r.block:>5}  {f'[{r.t_lo:.4g}, {r.t_hi:.4g}]':<22} {r.kl:9.4f} {r.stderr:8.4f}")
    print(f"{'prior':>5}  {'[1, N(0, I)]':<22} {prior:9.4f} {prior_se:8.4f}")
    print(f"{'total':>5}  {'':<22} {total:9.4f} {total_se:8.4f}")
    print(
        "each row: what its block alone costs the ODE's NLL with every other block exact "
        "(psm nll --exact-blocks measures the same through the whole ODE); the rows do not "
        "add up to a model's NLL gap exactly"
    )
    return 0
