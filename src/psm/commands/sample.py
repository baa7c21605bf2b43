"""``psm sample RUN -n N --out FILE``: draw samples through the blocks (paper eqs. 3, 5 and 7).

``--out`` picks the format by its suffix:

* ``.npz``: ``samples`` (``[n, *shape]`` float array, in the model's space) and ``settings``
  (a JSON string: run, method, solver, steps, seed, time and peak memory, ...); read with
  ``f = np.load(path); x = f["samples"]; s = json.loads(str(f["settings"]))``. For image runs
  ``dataset.to_unit(x)`` maps the samples back to ``[0, 1]``.
* ``.png``: 2D data: a scatter of the samples beside data samples; image data: a grid of the
  samples mapped back to ``[0, 1]`` (:meth:`~psm.data.images.ImageDataset.to_unit`).

Like the paper's tables 7-9 it reports the time per sample and the peak memory (CUDA's
``max_memory_allocated`` on a GPU, else the process's peak resident set size), printed and
stored in the settings. An existing ``--out`` is refused unless ``--force``; every check runs
before any sampling. RUN is a run directory or a model written by ``psm export`` (no run
directory needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PSMError
from .model_flags import (
    add_model_arguments,
    add_ode_arguments,
    check_positive,
    dtype_of,
    format_cost,
    grid_field_for,
    ode_settings,
    peak_memory,
    reset_peak_memory,
    resolve_device,
    set_threads,
    warn,
)

if TYPE_CHECKING:
    import torch

FORMATS = (".npz", ".png")
DEFAULT_POINTS = 10000  # 2D runs
DEFAULT_IMAGES = 64  # image runs


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="draw samples from a trained run (.npz array, .png scatter or image grid)",
        description="Draw samples from noise to data through the blocks, with the "
        "probability-flow ODE or the reverse SDE, and write them as .npz, or as .png: a "
        "scatter (2D runs) or an image grid (image runs). Reports the time per sample and the "
        "peak memory.",
    )
    p.add_argument("run", help="run directory, or a model written by psm export")
    p.add_argument(
        "-n",
        "--n",
        type=int,
        help=f"number of samples (default {DEFAULT_POINTS} points, or {DEFAULT_IMAGES} images)",
    )
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
    p.add_argument("--nrow", type=int, help="image runs, .png: images per row (default ~sqrt n)")
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

    from ..core.sample import sample
    from ..data.base import PixelMap
    from ..progress import progress_bar
    from ..runs.inference import open_source

    out = Path(args.out)
    check_out(out, args.force)
    check_positive(n=args.n, batch_size=args.batch_size, nrow=args.nrow)
    run = open_source(args.run)  # a run directory or an exported file
    run.check_data()  # a run's changed or vanished data file, before anything is built from it
    set_threads(args)
    ev = run.config.eval
    image = len(run.shape) == 3
    png = out.suffix.lower() == ".png"
    if png and run.shape != (2,) and not image:
        raise PSMError(
            f"--out .png draws 2D points or images; {run.config.data.name} points have shape "
            f"{run.shape} (write .npz)"
        )
    if args.nrow and not (png and image):
        raise PSMError("--nrow applies to image grids (--out .png on an image run)")
    dataset = run.dataset if png else None  # the scatter's data, or the map back to [0, 1]
    if png and image and not isinstance(dataset, PixelMap):
        raise PSMError(
            f"--out .png: {run.config.data.name} points of shape {run.shape} have no map back "
            "to pixels (write .npz)"
        )
    n = args.n or (DEFAULT_IMAGES if image else DEFAULT_POINTS)
    if args.method == "sde" and (args.solver or args.rtol or args.atol):
        raise PSMError("--solver/--rtol/--atol apply to --method ode (the SDE is Euler–Maruyama)")
    ode = ode_settings(args, run.config.eval.solver_settings(), blocks=run.num_blocks)
    if args.method == "sde":  # Euler–Maruyama: of the run's solver it takes the steps only
        ode = dataclasses.replace(ode, method="euler")
    device = resolve_device(args.device)
    dtype = dtype_of(args.dtype)
    grid_field = grid_field_for(args, run)
    model = run.load(device=device, dtype=dtype, grid_field=grid_field)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    reset_peak_memory(device)
    start = time.perf_counter()
    with progress_bar(f"sample ({args.method})", enabled=not args.no_progress) as bar:
        x = sample(
            model, n, generator=gen, method=args.method, solver=ode,
            batch_size=args.batch_size, dtype=dtype, device=device, progress=bar,
        )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    memory, memory_kind = peak_memory(device)
    if args.method == "sde":
        how = "reverse SDE, Euler–Maruyama " + ode.describe().removeprefix(ode.method + " ")
    else:
        how = "ODE, " + ode.describe()
    settings = _settings(run, args, n, ode, grid_field if model.is_grid else None, str(device))
    settings |= {
        "seconds": round(seconds, 3),
        "seconds_per_sample": seconds / n,
        "peak_memory_mb": round(memory, 1) if memory is not None else None,
        "memory_kind": memory_kind,
    }
    if not png:
        _write_npz(out, x, settings)
    elif image:
        from ..viz.images import save_image_grid

        save_image_grid(dataset.to_unit(x.float()), out, nrow=args.nrow)
    else:
        from ..viz.samples import plot_samples

        data = _scatter_data(run, min(n, 20000), ev.test_seed)
        title = f"{run.config.name}: {n} samples, {how}, seed {args.seed}"
        plot_samples({f"model ({args.method})": x}, out, data=data, title=title)
    bad = int((~torch.isfinite(x).flatten(1).all(1)).sum())
    if bad:
        warn(f"{bad} of {n} sample(s) are not finite")
    unit = "image" if image else "sample"
    cost = format_cost(seconds, n, unit, memory, memory_kind)
    print(f"{n} samples ({how}, seed {args.seed}) in {cost}", file=sys.stderr)
    print(out)
    return 0


def _scatter_data(run, n: int, seed: int):
    """Test points to draw beside the samples; none for an exported model whose data are not
    here (the scatter then shows the samples alone)."""
    from ..data import DataError

    try:
        return run.test_data().test_set(n, seed)
    except DataError:
        if run.run is not None:
            raise
        warn(f"the data of {run.path} are not here: the scatter shows the samples alone")
        return None


def _settings(run, args: argparse.Namespace, n: int, ode, field, device: str) -> dict[str, Any]:
    steps = ode.steps
    adaptive = args.method == "ode" and not ode.fixed_step
    return {
        "run": str(run.path),
        "name": run.config.name,
        "config_hash": run.hash,
        "dataset": run.config.data.name,
        "n": n,
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

    from ..runs.atomic import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, samples=x.detach().cpu().numpy(), settings=np.array(json.dumps(settings)))
    atomic_write_bytes(out, buf.getvalue())
