"""``psm compare RUN RUN [RUN...]``: runs on the same test points, with paired errors.

Every run is scored on the first run's test points (``--n``, ``--seed``; defaults from the
first run's ``eval`` section; image runs in ``psm nll``'s ``psm`` convention, uniformly
dequantized or with ``--dequantization truncated-normal``), or its per-point NLLs are read from
files written by ``psm nll --values`` (``--values A.npy B.npy ...``, one per run, in order, all
made with the same ``--n``, ``--seed`` and dequantization: a truncated-normal file carries it
in ``A.npy.json``, a file without one is uniform). Runs whose test points differ (another data
set or split; for truncated-normal dequantization also another data map or noise ``σ_t0/α_t0``)
and values made under different dequantizations are refused in one line, naming the field.
Uniformly dequantized image runs with different data maps (``data.center``, ``data.scale``)
compare: they score the same images with the same noise, each through its own map, and bits/dim
count the map's log-Jacobian, so the figures are of one discrete distribution, paired per image.

The table gives each run's NLL in nats (bits/dim for images) ± its standard error, the
difference against the first run and the **paired** standard error of that difference,
``std(v_r - v_first) / sqrt(n)`` (:func:`psm.runs.scoring.paired_stats`): the two runs'
errors on the same points are correlated, so the paired error is usually far smaller than the
unpaired ``sqrt(se_r² + se_first²)``, shown beside it. ``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
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
    resolve_device,
    set_threads,
)
from .nll import TRACE_CHOICES, add_dequantization_argument, resolve_settings

if TYPE_CHECKING:  # numpy and torch are imported when the command runs
    import numpy as np


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare runs on the same test points: NLL (bits/dim) and paired errors",
        description="Score every run on the first run's test points (or read per-point NLLs "
        "written by psm nll --values) and print each run's NLL (bits/dim for images) ± s.e., "
        "its difference against the first run and the paired standard error of the difference.",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directories or exported models (two or more)"
    )
    p.add_argument(
        "--values",
        nargs="+",
        metavar="FILE.npy",
        help="per-point NLLs from psm nll --values, one file per run in the same order "
        "(all made with the same --n and --seed); nothing is scored",
    )
    p.add_argument("--n", type=int, help="test points (default: the first run's eval.n_test)")
    p.add_argument(
        "--seed", type=int, help="seed of the test set (default: the first run's eval.test_seed)"
    )
    add_ode_arguments(p, steps_default="each run's eval.steps")
    p.add_argument("--trace", choices=TRACE_CHOICES, default="auto", help="as psm nll")
    p.add_argument("--probes", type=int, default=1, help="Hutchinson probes per solve")
    p.add_argument("--force", action="store_true", help="allow --trace exact above 16 dims")
    p.add_argument("--batch-size", type=int, default=1000, help="points per solve")
    p.add_argument("--probe-seed", type=int, default=0, help="seed of the Hutchinson probes")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    add_dequantization_argument(
        p, default=None, extra="; with --values, that of the files (FILE.npy.json), checked"
    )
    add_model_arguments(p)
    p.set_defaults(func=cmd_compare, convention="psm")


def cmd_compare(args: argparse.Namespace) -> int:
    from ..runs.scoring import open_for_scoring

    if len(args.runs) < 2:
        raise PSMError("compare needs at least two runs")
    if args.values is not None and len(args.values) != len(args.runs):
        raise PSMError(
            f"--values: {len(args.values)} file(s) for {len(args.runs)} runs (one per run)"
        )
    set_threads(args)
    check_positive(n=args.n, batch_size=args.batch_size, probes=args.probes)
    runs = [open_for_scoring(r) for r in args.runs]
    first = runs[0]
    ev = first.config.eval
    seed = ev.test_seed if args.seed is None else args.seed
    image = _image(first)
    log_q: list | None = None
    if args.values is not None:
        values = [read_values(Path(v)) for v in args.values]
        lengths = {len(v) for v in values}
        if len(lengths) > 1:
            sizes = ", ".join(f"{f}: {len(v)}" for f, v in zip(args.values, values))
            raise PSMError(f"--values files hold different numbers of points ({sizes})")
        n = len(values[0])
        dequantization, log_q, scale = values_dequantization(args.values, values,
                                                             args.dequantization)  # fmt: skip
        if log_q is not None and not image:
            raise PSMError(f"--values: truncated-normal values are of images; {args.runs[0]} "
                           "has no levels")  # fmt: skip
        check_same_points(runs, args.runs, n=n, seed=seed)
        settings = [None] * len(runs)
    else:
        from ..runs.inference import check_dequantization

        n = args.n or ev.n_test
        dequantization = check_dequantization(first, args.dequantization or "uniform")
        args.dequantization = dequantization or "uniform"  # every run's settings take it
        xs, q_first, scale = check_same_points(
            runs, args.runs, n=n, seed=seed, dequantization=args.dequantization
        )
        values, settings = score_runs(args, runs, xs, q_first)
        log_q = None if q_first is None else [q_first.double().numpy()] * len(runs)
        n = len(values[0])
    if n < 2:
        raise PSMError(f"a paired comparison needs at least 2 points, got {n}")
    cached = args.values is not None
    report = comparison(
        args.runs, runs, values, settings, image=image, n=n, seed=None if cached else seed,
        log_q=log_q, noise_scale=scale,
    )  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        print(format_table(report))
    return 0


def _image(run) -> bool:
    from ..runs.inference import is_image_data

    return is_image_data(run.dataset)


def read_values(path: Path) -> np.ndarray:
    """Per-point NLLs ``[n]`` float64 from a ``.npy`` (as ``psm nll --values`` writes it).

    Raises:
        PSMError: missing, unreadable, pickled, not 1-D numeric, empty or non-finite.
    """
    import numpy as np

    if not path.is_file():
        raise PSMError(f"--values {path}: no such file")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        msg = " ".join(str(e).split())
        raise PSMError(f"--values {path}: not a readable .npy array ({msg})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "iuf" or arr.ndim != 1:
        what = f"{arr.dtype} {list(arr.shape)}" if isinstance(arr, np.ndarray) else "an archive"
        raise PSMError(f"--values {path}: {what}; expected NLLs per point, a 1-D float array")
    if arr.size == 0:
        raise PSMError(f"--values {path}: no values")
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise PSMError(f"--values {path}: {bad} non-finite value(s); a mean would be meaningless")
    return arr.astype(np.float64)


def check_same_points(
    runs: list, names: list[str], *, n: int, seed: int, dequantization: str = "uniform"
):
    """Each run's test points ``[n', *shape]`` (model space, ``psm`` convention for images,
    dequantized by ``dequantization``), after checking that every run would score exactly the
    same points — for uniformly dequantized images, the same dequantized images ``(k + u)/L``
    before each run's own data map (``data.center``, ``data.scale`` may differ).

    Returns:
        ``(xs, log_q, noise_scale)``: ``xs`` one tensor per run; for truncated-normal
        dequantization ``log_q [n']`` of the noise and its ``σ_t0/α_t0`` (the same for every
        run), else ``(xs, None, None)``.

    Raises:
        PSMError: a run's test points differ (another data set, split or shape, a data map
            outside uniformly dequantized images, or for truncated-normal dequantization
            another ``σ_t0/α_t0``: another process or ``t0``), naming the first differing
            field when there is one.
    """
    import torch

    from ..runs.inference import truncated_normal_test_set

    tn = dequantization == "truncated-normal"

    def points(run):
        if tn:
            x, log_q, q = truncated_normal_test_set(
                run.test_data(), run.process, t0=run.partition.t0, n=n, seed=seed
            )
            return x, log_q, q.scale
        dequantize = True if _image(run) else None
        return run.test_data().test_set(n, seed, dequantize=dequantize), None, None

    def same_images(a, b) -> bool:  # uniform: the same (k + u) / L before each run's map
        if tn or not (_image(a) and _image(b)):
            return False
        da, db = a.test_data(), b.test_data()
        ka, kb = da.test_levels(n), db.test_levels(n)
        if da.levels != db.levels or ka.shape != kb.shape or not torch.equal(ka, kb):
            return False
        ua = da.levels_to_unit(ka, torch.Generator().manual_seed(seed))
        ub = db.levels_to_unit(kb, torch.Generator().manual_seed(seed))
        return torch.equal(ua, ub)

    x, log_q, scale = points(runs[0])
    xs = [x]
    for run, name in zip(runs[1:], names[1:]):
        if tuple(run.shape) != tuple(runs[0].shape):
            raise PSMError(
                f"{name}: data of shape {list(run.shape)}, {names[0]}'s are "
                f"{list(runs[0].shape)}; compare runs trained on the same data"
            )
        y, _, other = points(run)
        if tn and other != scale:
            raise PSMError(
                f"{name}: truncated-normal dequantization noise sigma/alpha at t0 = {other:.6g}, "
                f"{names[0]}'s is {scale:.6g} (process or t0 differ: t0 {run.partition.t0:g} vs "
                f"{runs[0].partition.t0:g}), so their test points differ; compare them under "
                "--dequantization uniform"
            )
        if (y.shape != x.shape or not torch.equal(x, y)) and not same_images(runs[0], run):
            raise PSMError(f"{name}: {_data_difference(runs[0], run, names[0])}")
        xs.append(y)
    return xs, log_q, scale


def read_values_settings(path: Path) -> dict[str, Any] | None:
    """The dequantization ``psm nll --values`` recorded beside a truncated-normal values file
    (``FILE.npy.json``); None for a file without one (uniform dequantization).

    Raises:
        PSMError: an unreadable or malformed settings file.
    """
    from .nll import values_settings_path

    side = values_settings_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise PSMError(f"--values {path}: {side} is not readable JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("log_q"), list):
        raise PSMError(f"--values {path}: {side} holds no dequantization settings (log_q)")
    return meta


def values_dequantization(files: list[str], values: list, flag: str | None):
    """The one dequantization of ``--values`` files (from their ``FILE.npy.json``; uniform
    without one), checked alike across the files and against ``--dequantization``.

    Returns:
        ``(dequantization, log_q, noise_scale)``: for truncated-normal files ``log_q`` is a list
        of per-point arrays ``[n]`` (one per file) and ``noise_scale`` their ``σ_t0/α_t0``;
        ``("uniform", None, None)`` otherwise.

    Raises:
        PSMError: files made under different dequantizations (or noises, or test seeds), or
            another dequantization than ``--dequantization`` names, naming the field; a
            ``log_q`` whose length is not the values'.
    """
    import numpy as np

    metas = [read_values_settings(Path(f)) for f in files]
    kinds = [m.get("dequantization", "truncated-normal") if m else "uniform" for m in metas]
    for field in ("dequantization", "dequantization_scale", "test_seed"):
        got = [kinds[i] if field == "dequantization" else (m or {}).get(field)
               for i, m in enumerate(metas)]  # fmt: skip
        for f, v in zip(files[1:], got[1:]):
            if v != got[0]:
                raise PSMError(
                    f"--values {f} was made under {field} {v}, {files[0]} under {got[0]}; "
                    "compare values made under the same dequantization"
                )
    if flag is not None and flag != kinds[0]:
        raise PSMError(
            f"--values files were made under dequantization {kinds[0]}, not {flag} "
            "(--dequantization)"
        )
    if kinds[0] != "truncated-normal":
        return kinds[0], None, None
    log_q = []
    for f, m, v in zip(files, metas, values):
        q = np.asarray(m["log_q"], dtype=np.float64)
        if q.shape != v.shape:
            raise PSMError(f"--values {f}: {len(q)} log q value(s) for {len(v)} points")
        log_q.append(q)
    return kinds[0], log_q, metas[0].get("dequantization_scale")


def _data_difference(a, b, name_a: str) -> str:
    da = a.config.data.model_dump(mode="json")
    db = b.config.data.model_dump(mode="json")
    for key in sorted(set(da) | set(db)):
        if da.get(key) != db.get(key):
            return (
                f"its test points differ from {name_a}'s (data.{key}: {db.get(key)!r} vs "
                f"{da.get(key)!r}); compare runs trained on the same data"
            )
    return (
        f"its test points differ from {name_a}'s (same data section: the split follows "
        f"train.seed, {b.config.train.seed} vs {a.config.train.seed}, or the data files "
        "differ); compare runs trained on the same data"
    )


def score_runs(
    args: argparse.Namespace, runs: list, xs: list, log_q=None
) -> tuple[list[np.ndarray], list]:
    """Each run's per-point NLLs on its test points ``xs[i]`` (nats, float64), under its own
    settings (``log_q``: the truncated-normal noise's, for the scores' bits/dim)."""
    from ..runs.scoring import load_scoring_model, score_inputs

    device = resolve_device(args.device)
    dtype = dtype_of(args.dtype)
    settings = [resolve_settings(args, run) for run in runs]  # every flag checked first
    values = []
    for run, s, x in zip(runs, settings, xs):
        model = load_scoring_model(
            run, device=device, dtype=dtype, grid_field=grid_field_for(args, run)
        )
        scores = score_inputs(
            model, x, run.dataset, s, probe_seed=args.probe_seed, batch_size=args.batch_size,
            device=device, dtype=dtype, progress=not args.no_progress, log_q=log_q,
        )  # fmt: skip
        v = scores.result.values.double().numpy()
        bad = int((~scores.result.values.isfinite()).sum())
        if bad:
            raise PSMError(f"{run.path}: {bad} point(s) have a non-finite log-likelihood")
        values.append(v)
        print(f"scored {run.path} ({s.solver.describe()}, {s.trace} trace)", file=sys.stderr)
    return values, settings


def comparison(
    names: list[str], runs: list, values: list[np.ndarray], settings: list, *, image: bool,
    n: int, seed: int | None, log_q: list[np.ndarray] | None = None,
    noise_scale: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The report: per run the figure ± s.e., the difference against the first and its paired
    and unpaired errors (bits/dim for image runs, converted per point by the data's formula,
    or under truncated-normal dequantization, ``log_q`` given per run, by
    ``(nll + log_q) / (D ln 2)``)."""
    from ..runs.scoring import paired_stats

    first = runs[0].dataset
    if image and log_q is not None:
        d_ln2 = math.prod(first.shape) * math.log(2)
        per_point = [(v + q) / d_ln2 for v, q in zip(values, log_q)]
    else:
        # each run through its own data map's log-Jacobian (data.scale may differ)
        per_point = [r.dataset.bits_per_dim(v) for r, v in zip(runs, values)] if image else values
    dequantization = ("truncated-normal" if log_q is not None else "uniform") if image else None
    rows = paired_stats(per_point)
    unit = "bits/dim" if image else "nats"
    report: dict[str, Any] = {
        "metric": "bpd" if image else "nll",
        "unit": unit,
        "n": n,
        "test_seed": seed,
        "dataset": first.name,
        "dequantization": dequantization,
        "runs": [],
    }
    if image:
        from ..runs.nll_records import convention_label

        report["convention"] = convention_label("psm", first.levels, dequantization, noise_scale)
        if noise_scale is not None:
            report["dequantization_scale"] = noise_scale
    for name, row, s in zip(names, rows, settings):
        report["runs"].append(
            {
                "run": name,
                "value": row.mean,
                "stderr": row.stderr,
                "diff": row.diff,
                "diff_stderr_paired": _finite(row.diff_stderr),
                "diff_stderr_unpaired": _finite(row.unpaired_stderr),
                "z_paired": _finite(row.z),
                "solver": s.solver.describe() if s is not None else None,
                "trace": s.trace if s is not None else None,
                "source": "scored" if s is not None else "values file",
            }
        )
    return report


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def format_table(report: dict[str, Any]) -> str:
    """The report as a table for a person."""
    unit = report["unit"]
    metric = "bits/dim" if report["metric"] == "bpd" else "NLL (nats)"
    rows = report["runs"]
    width = max(len("run"), *(len(r["run"]) for r in rows))
    head = (
        f"{'run':<{width}}  {metric:>20}  {'diff vs first':>13}  {'paired s.e.':>11}  "
        f"{'diff/s.e.':>9}  {'unpaired s.e.':>13}"
    )
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows):
        value = f"{r['value']:.4f} ± {r['stderr']:.4f}"
        if i == 0:
            lines.append(f"{r['run']:<{width}}  {value:>20}  {'(reference)':>13}")
            continue

        def fmt(x: float | None, spec: str) -> str:
            return format(x, spec) if x is not None else "nan"

        lines.append(
            f"{r['run']:<{width}}  {value:>20}  {r['diff']:>+13.4f}  "
            f"{fmt(r['diff_stderr_paired'], '11.4f'):>11}  {fmt(r['z_paired'], '+9.1f'):>9}  "
            f"{fmt(r['diff_stderr_unpaired'], '13.4f'):>13}"
        )
    seed = report["test_seed"]
    how = f"{report['n']} test points of {report['dataset']}"
    how += f" (seed {seed}), {unit}" if seed is not None else f", {unit}"
    if report.get("convention"):
        how += f" [{report['convention']}]"
    sources = {r["source"] for r in rows}
    if sources == {"values file"}:
        how += "; per-point values read from files"
    else:
        solvers = {f"{r['solver']}, {r['trace']} trace" for r in rows}
        how += "; " + ("; ".join(sorted(solvers)) if len(solvers) > 1 else solvers.pop())
    note = "paired s.e. = std of per-point differences / sqrt(n); lower is better"
    return "\n".join([*lines, how, note])
