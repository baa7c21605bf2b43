"""A small pool of spawned worker processes that train tasks of blocks.

Worker i works on GPU ``i mod n`` when the machine has n > 1 GPUs (``train.device: cuda`` or
``auto``), and on the CPU when it has none (``auto``). Each worker takes a task (a list of block
ids) from a queue and trains it with :func:`psm.executors.task.run_task` (one block per task, or
a stack of blocks). Ctrl-C or SIGTERM in the driver is passed on to the workers as SIGTERM;
each saves a checkpoint at its current step and stops. A worker that dies (killed, out of
memory) has its blocks reported failed; running the same command again resumes them.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
from pathlib import Path
from typing import Literal

import torch.multiprocessing as mp

from ..runs.run import Run
from ..training.train import BlockOutcome, note_failure

TaskKind = Literal["block", "ensemble"]


def _worker(
    index: int,
    run_path: str,
    kind: TaskKind,
    threads: int,
    max_stack: int | None,
    tasks: mp.Queue,
    results: mp.Queue,
) -> None:
    # Ctrl-C reaches the whole process group; the training loops turn it into a clean stop.
    try:
        import torch

        torch.set_num_threads(threads)
        if torch.cuda.is_available() and torch.cuda.device_count() > 1:
            # one GPU per worker: "cuda" (and "auto") resolve to this worker's current device
            torch.cuda.set_device(index % torch.cuda.device_count())
        from ..runs.run import Run
        from .task import run_task

        run = Run.open(run_path)
        while True:
            task = tasks.get()
            if task is None:
                return
            results.put(("start", task, os.getpid()))
            try:  # a PSMError comes back as failed outcomes, with its one-line message
                outs = run_task(run, task, stacked=kind == "ensemble", max_stack=max_stack)
            except Exception as e:  # report it; never leave the driver waiting
                outs = [BlockOutcome(b, "failed", error=f"{type(e).__name__}: {e}") for b in task]
            results.put(("done", task, outs))
            if any(o.state == "interrupted" for o in outs):
                return
    except KeyboardInterrupt:
        return


def run_pool(
    run_path: Path,
    tasks: list[list[int]],
    *,
    kind: TaskKind,
    workers: int,
    threads: int,
    max_stack: int | None = None,
) -> list[BlockOutcome]:
    """Train ``tasks`` on ``workers`` spawned processes; one outcome per block."""
    ctx = mp.get_context("spawn")
    task_q: mp.Queue = ctx.Queue()
    result_q: mp.Queue = ctx.Queue()
    for t in tasks:
        task_q.put(t)
    n = max(1, min(workers, len(tasks)))
    for _ in range(n):
        task_q.put(None)
    procs = [
        ctx.Process(
            target=_worker,
            args=(i, str(run_path), kind, threads, max_stack, task_q, result_q),
            daemon=False,
        )
        for i in range(n)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, BlockOutcome] = {}
    started: dict[int, list[int]] = {}  # pid -> task in progress
    remaining = sum(len(t) for t in tasks)
    interrupted = False
    try:
        while len(outcomes) < remaining:
            try:
                msg = result_q.get(timeout=0.5)
            except queue.Empty:
                if all(not p.is_alive() for p in procs):
                    break
                _reap_dead(procs, started, outcomes)
                continue
            if msg[0] == "start":
                started[msg[2]] = msg[1]
            else:
                for o in msg[2]:
                    outcomes[o.block] = o
                for pid, task in list(started.items()):
                    if task == msg[1]:
                        del started[pid]
    except KeyboardInterrupt:
        interrupted = True
        for p in procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)
        # collect what the workers report while they save and stop
        while any(p.is_alive() for p in procs) or not result_q.empty():
            try:
                msg = result_q.get(timeout=0.5)
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                continue
            if msg[0] == "done":
                for o in msg[2]:
                    outcomes[o.block] = o
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        _reap_dead(procs, started, outcomes)
    interrupted = interrupted or any(o.state == "interrupted" for o in outcomes.values())
    for t in tasks:
        for b in t:
            if b not in outcomes:
                state = "interrupted" if interrupted else "failed"
                outcomes[b] = BlockOutcome(b, state, error="not run" if interrupted else None)
    run = Run.open(run_path)
    for o in outcomes.values():
        note_failure(run, o)  # e.g. a killed worker: psm status says so
    return [outcomes[b] for t in tasks for b in t]


def _reap_dead(procs, started, outcomes) -> None:
    for p in procs:
        if p.exitcode not in (None, 0) and p.pid in started:
            for b in started.pop(p.pid):
                outcomes.setdefault(
                    b,
                    BlockOutcome(b, "failed", error=f"worker died (exit code {p.exitcode})"),
                )
