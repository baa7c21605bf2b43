"""``psm export RUN model.safetensors``: a finished run as one file that travels.

The file holds every block's final weights (the EMA ones when the run kept an EMA) and, in its
metadata, the config, its hash, the data manifest (what the model was trained on) and the data
map (:mod:`psm.runs.export`). ``psm nll``, ``psm sample`` and ``psm score`` take it in place of
the run directory, and so does :func:`psm.load`. An existing output is refused; the file is
written atomically.
"""

from __future__ import annotations

import argparse
import sys


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a finished run as one .safetensors file (weights, config, data map)",
        description="Write every block's final weights (EMA when the run keeps one) into one "
        "safetensors file, with the config, its hash, the data digest and the data map in its "
        "metadata. psm nll/sample/score and psm.load() read it without the run directory.",
    )
    p.add_argument("run", help="run directory (every block done)")
    p.add_argument("out", metavar="FILE.safetensors", help="the file to write (must not exist)")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from ..runs.export import export_run

    path = export_run(args.run, args.out)
    size = path.stat().st_size
    shown = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
    print(f"exported {args.run} ({shown})", file=sys.stderr)
    print(path)
    return 0
