"""Command-line options of the cluster executors, and the scheduler states they record."""

from __future__ import annotations

import argparse

from ..run import Run


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for ``psm train`` that configure the ray and slurm executors."""
    g = p.add_argument_group("cluster executors (ray, slurm)")
    g.add_argument("--address", help="ray: cluster address ('auto' or host:port)")


def cluster_options(args: argparse.Namespace) -> dict:
    """The cluster flags given on the command line, by option name."""
    return {"address": getattr(args, "address", None)}


def job_states(run: Run) -> dict[int, str]:
    """Per block, the scheduler's state of its latest job, where an executor recorded one."""
    return {}
