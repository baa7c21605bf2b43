"""``psm bench NAME``: run a benchmark, write JSON and a section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import importlib
import sys

from ..bench import BENCHMARKS


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="speed benchmarks (JSON + docs/benchmarks.md)")
    names = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name in BENCHMARKS:
        mod = importlib.import_module(f"psm.bench.{name}")
        q = names.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0])
        q.add_argument(
            "--json",
            dest="json_out",
            default=f"bench-out/{name}.json",
            help="where to write the JSON result",
        )
        q.add_argument(
            "--doc",
            default="docs/benchmarks.md",
            help="markdown file whose section is replaced ('' for none)",
        )
        mod.add_arguments(q)
        q.set_defaults(func=_run(mod, name))
    importlib.import_module("psm.bench.gpu").add_parser(names)  # own flags: --append, no --doc


def _run(mod, name: str):
    def cmd(args: argparse.Namespace) -> int:
        from ..bench.report import machine_info, write_results

        result, markdown = mod.run(args)
        result = {"benchmark": name, "machine": machine_info(), **result}
        write_results(result, args.json_out, args.doc or None, name, markdown)
        print(markdown)
        print(f"wrote {args.json_out}" + (f" and {args.doc}" if args.doc else ""), file=sys.stderr)
        return 0

    return cmd
