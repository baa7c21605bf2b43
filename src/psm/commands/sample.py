"""``psm sample RUN -n N --out FILE``: draw samples through the blocks (paper eqs. 3, 5 and 7).

``--out`` picks the format by its suffix:

* ``.npz``: ``samples`` (``[n, *shape]`` float array) and ``settings`` (a JSON string: run,
  method, solver, steps, seed, ...); read with
  ``f = np.load(path); x = f["samples"]; s = json.loads(str(f["settings"]))``.
* ``.png``: a scatter of the samples beside data samples (2D data only).

An existing ``--out`` is refused unless ``--force``; every check runs before any sampling.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PSMError
from .model_flags import (
    add_model_arguments,
    add_ode_arguments,
    check_positive,
    dtype_of,
    grid_field_for,
    ode_settings,
    resolve_device,
    warn,
)

if TYPE_CHECKING:
    import torch

FORMATS = (".npz", ".png")


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="draw samples from a trained run (.npz array or .png scatter)",
        description="Draw samples from noise to data through the blocks, with the "
        "probability-flow ODE or the reverse SDE, and write them as .npz or a .png scatter.",
    )
    p.add_argument("run", help="run directory")
    p.add_argument("-n", "--n", type=int, default=10000, help="number of samples (default 10000)")
    p.add_argument(
        "--method",
        choices=["ode", "sde"],
        default="ode",
        help="probability-flow ODE or reverse SDE (Euler–Maruyama) (default ode)",
    )
    add_ode_arguments(p, steps_default="eval.steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    p.add_argument("--batch-size", type=int, default=2000, help="samples per solve (default 2000)")
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.npz or FILE.png")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    add_model_arguments(p)
    p.set_defaults(func=cmd_sample)


def check_out(out: Path, force: bool) -> None:
    """Refuse an unknown suffix, a missing folder, or an existing file without ``--force``."""
    if out.suffix.lower() not in FORMATS:
        raise PSMError(
            f"--out {out}: unknown format {out.suffix or '(no suffix)'!r}; use .npz or .png"
        )
    if not out.parent.is_dir():
        raise PSMError(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise PSMError(f"--out {out} is a directory")
    if out.exists() and not force:
        raise PSMError(f"--out {out} exists; pass --force to overwrite it")


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from ..run import Run
    from ..sample import sample
    from ..trained import load_model

    out = Path(args.out)
    check_out(out, args.force)
    check_positive(n=args.n, batch_size=args.batch_size)
    run = Run.open(args.run)
    ev = run.config.eval
    if out.suffix.lower() == ".png" and run.shape != (2,):
        raise PSMError(
            f"--out .png draws 2D points; {run.config.data.name} points have shape "
            f"{run.shape} (write .npz)"
        )
    if args.method == "sde" and (args.solver or args.rtol or args.atol):
        raise PSMError("--solver/--rtol/--atol apply to --method ode (the SDE is Euler–Maruyama)")
    ode = ode_settings(args, solver=ev.solver, steps=ev.steps, blocks=run.num_blocks)
    device = resolve_device(args.device)
    dtype = dtype_of(args.dtype)
    grid_field = grid_field_for(args, run)
    model = load_model(run, device=device, dtype=dtype, grid_field=grid_field)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = sample(
        model, args.n, generator=gen, method=args.method, solver=ode,
        batch_size=args.batch_size, dtype=dtype, device=device, progress=not args.no_progress,
    )  # fmt: skip
    if args.method == "sde":
        how = "reverse SDE, Euler–Maruyama " + ode.describe().removeprefix(ode.method + " ")
    else:
        how = "ODE, " + ode.describe()
    settings = _settings(run, args, ode, grid_field if model.is_grid else None, str(device))
    if out.suffix.lower() == ".npz":
        _write_npz(out, x, settings)
    else:
        from ..viz.samples import plot_samples

        data = run.dataset.test_set(min(args.n, 20000), ev.test_seed)
        title = f"{run.config.name}: {args.n} samples, {how}, seed {args.seed}"
        plot_samples({f"model ({args.method})": x}, out, data=data, title=title)
    bad = int((~torch.isfinite(x).flatten(1).all(1)).sum())
    if bad:
        warn(f"{bad} of {args.n} sample(s) are not finite")
    print(f"{args.n} samples ({how}, seed {args.seed})", file=sys.stderr)
    print(out)
    return 0


def _settings(run, args: argparse.Namespace, ode, field, device: str) -> dict[str, Any]:
    steps = ode.steps
    adaptive = args.method == "ode" and not ode.fixed_step
    return {
        "run": str(run.path),
        "name": run.config.name,
        "config_hash": run.hash,
        "dataset": run.config.data.name,
        "n": args.n,
        "method": args.method,
        "solver": ode.method if args.method == "ode" else "euler-maruyama",
        "steps": steps if isinstance(steps, int) else list(steps),
        "rtol": ode.rtol if adaptive else None,
        "atol": ode.atol if adaptive else None,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "grid_field": field,
        "device": device,
        "dtype": args.dtype,
    }


def _write_npz(out: Path, x: torch.Tensor, settings: dict[str, Any]) -> None:
    import numpy as np

    from ..atomic import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, samples=x.detach().cpu().numpy(), settings=np.array(json.dumps(settings)))
    atomic_write_bytes(out, buf.getvalue())
