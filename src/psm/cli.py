"""The ``psm`` command line.

Bad input (config, run directory, checkpoint, data, flags) is reported as one line on stderr
with exit code 2, and nothing on disk is overwritten. Ctrl-C stops training with a checkpoint at
the current step (exit code 130); the same command resumes. Each command is a module of
:mod:`psm.commands`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from .errors import PSMError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a reader that left early


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``psm train: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="psm",
        description="Parallel Score Matching: train diffusion models as independent time "
        "blocks, then sample and score them as one model.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"psm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from .commands import add_commands

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``psm`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a one-line flag error
        return int(e.code or 0) if isinstance(e.code, int) else EXIT_BAD_INPUT
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe (``psm ... | head``) fails here, not at exit
        return code
    except BrokenPipeError:  # the reader has gone: nothing more to say to it, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except PSMError as e:
        print(f"psm: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("psm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
