"""Benchmarks (``psm bench ...``): speed and memory, measured side by side in one run.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> dict``; the result is
written as JSON and as a markdown section of ``docs/benchmarks.md`` (see :mod:`.report`).
Benchmarks are never tests: this machine is shared and noisy, so figures are quoted as ratios
measured in the same run.
"""

BENCHMARKS: tuple[str, ...] = ("train", "stacks", "nll", "executors", "images")
