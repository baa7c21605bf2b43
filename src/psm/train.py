"""Training one block: ``train_block(run_dir, block_id)``, the only thing an executor calls.

A block is trained with Adam on fresh samples every step (appendix H). Block i of an interval
partition draws ``t ~ U[t_i, t_{i+1}]`` (Algorithm 1; K = 1 is SA-DPM, Algorithm 3); a grid
block uses its fixed time ``t_i`` (Algorithm 2). ``train_block`` is

* idempotent: a block that reached its target is skipped;
* resumable: it continues from the last checkpoint with Adam and RNG state, so a resumed block
  ends bit-for-bit where an uninterrupted one would;
* exclusive: a lock keeps a second worker off a block being trained;
* safe: a non-finite loss stops the block with an error naming it and the step, keeping the
  last good checkpoint; Ctrl-C / SIGTERM save a checkpoint at the current step.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .atomic import append_line, atomic_write_text
from .checkpoint import (
    BlockState,
    adam_moments,
    load_state,
    save_state,
    save_weights,
    set_adam_moments,
)
from .data import Dataset
from .errors import BlockError, PSMError, RunError
from .lock import BlockLocks, lock_holder, lock_holder_alive
from .process import Process
from .run import Run

SEED_INIT, SEED_DATA = 0, 1


def block_seed(seed: int, block: int, purpose: int) -> int:
    """A 63-bit seed for one purpose (init or data) of one block of a run."""
    return int(np.random.SeedSequence([seed, block, purpose]).generate_state(2, np.uint64)[0] >> 1)


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda if available else cpu; anything else as given, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise RunError(f"{name!r} is not a device (cpu, cuda, cuda:N, auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError("CUDA is not available here")
    return dev


def _train_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except RunError as e:
        raise RunError(f"train.device: {e}") from None


@dataclass
class BlockProblem:
    """What one block learns: its data, process, time range and a fresh net.

    Attributes:
        block: the block id.
        t_lo, t_hi: training times ``U[t_lo, t_hi]`` (equal for a DPSM grid point).
    """

    run: Run
    block: int
    dataset: Dataset
    process: Process
    t_lo: float
    t_hi: float
    device: torch.device
    batch_size: int

    @classmethod
    def build(cls, run: Run, block: int, dataset: Dataset | None = None) -> BlockProblem:
        cfg = run.config
        process = cfg.build_process()
        lo, hi = run.partition.train_range(block, process.t0)
        return cls(
            run, block, dataset or cfg.build_dataset(), process, lo, hi,
            _train_device(cfg.train.device), cfg.train.batch_size,
        )  # fmt: skip

    def new_net(self) -> nn.Module:
        """The block's net, initialised from its own seed (same weights in every executor)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(block_seed(self.run.config.train.seed, self.block, SEED_INIT))
            net = self.run.config.build_net(self.dataset.dim)
        return net.to(self.device)

    def new_generator(self) -> torch.Generator:
        seed = block_seed(self.run.config.train.seed, self.block, SEED_DATA)
        return torch.Generator(device=self.device).manual_seed(seed)

    def draw_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """One fresh batch: ``(x_t [B, D], t [B], target [B, D])`` (eq. 29)."""
        n = self.batch_size
        x0 = self.dataset.sample(n, generator)
        if self.t_hi > self.t_lo:
            t = torch.empty(n, device=self.device).uniform_(
                self.t_lo, self.t_hi, generator=generator
            )
        else:
            t = torch.full((n,), self.t_lo, device=self.device)
        noise = torch.randn(x0.shape, generator=generator, device=self.device)
        x_t, target = self.process.training_pair(x0, t, noise)
        return x_t, t, target


@dataclass
class BlockOutcome:
    """How one call ended for one block.

    ``state`` is ``done`` (trained to its target now), ``skipped`` (already done),
    ``locked`` (another live worker holds it), ``interrupted`` (stopped by a signal, checkpoint
    saved) or ``failed`` (``error`` says why).
    """

    block: int
    state: str
    step: int = 0
    last_loss: float | None = None
    error: str | None = None


@dataclass
class _LossWindow:
    """Per-step losses since the last flush, kept as tensors so GPU steps stay asynchronous."""

    start_step: int
    losses: list[Tensor] = field(default_factory=list)

    def flush(self) -> tuple[list[list[float]], int]:
        """Losses as ``[steps][blocks]`` floats and the step of the first entry."""
        if not self.losses:
            return [], self.start_step
        vals = torch.stack(self.losses).reshape(len(self.losses), -1).double().cpu().tolist()
        start = self.start_step
        self.start_step += len(self.losses)
        self.losses = []
        return vals, start


def first_nonfinite(values: list[float], start: int) -> int | None:
    """The step of the first non-finite loss in a window, or None."""
    for i, v in enumerate(values):
        if not math.isfinite(v):
            return start + i + 1
    return None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past ``step`` (they were logged after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    atomic_write_text(path, "".join(k + "\n" for k in keep))


class _Stopped(Exception):
    """A stop request seen between two optimizer steps."""


class StopRequest:
    """Set by SIGINT (Ctrl-C) or SIGTERM (cluster pre-emption, ``kill``) while installed.

    Training loops poll :meth:`is_set` between steps and save an exact checkpoint, so a stop
    never lands in the middle of an optimizer step. A second Ctrl-C raises KeyboardInterrupt.
    """

    def __init__(self) -> None:
        self._set = False
        self._old: dict[int, object] = {}

    def is_set(self) -> bool:
        return self._set

    def _handle(self, signum, frame) -> None:
        if self._set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._set = True

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old.clear()


def make_adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """Adam (appendix H) with the fused kernel where the device supports it.

    Every trainer builds its optimizer here, so a block gets the same update arithmetic in any
    executor (and the ensemble's stacked Adam is elementwise identical to K separate ones).
    """
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def time_budget(max_seconds: float | None):
    """A predicate ``wall_time -> bool`` that says when a block's time budget is spent."""
    if max_seconds is None:
        return lambda wall: False
    return lambda wall: wall >= max_seconds


def train_block(run_dir: str | Path | Run, block: int) -> BlockOutcome:
    """Train one block of a run to its step target (see the module docstring).

    Args:
        run_dir: the run directory (or an open :class:`~psm.run.Run`).
        block: the block id, ``0 <= block < K``.

    Returns:
        The :class:`BlockOutcome`. Bad input (missing run, foreign checkpoint) raises a
        :class:`~psm.errors.PSMError`; a non-finite loss returns ``state="failed"``.
    """
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    run.check_block_ids([block])
    if run.is_done(block):
        rec = run.read_status(block) or {}
        return BlockOutcome(block, "skipped", rec.get("step", 0), rec.get("last_loss"))
    with BlockLocks() as locks:
        if not locks.acquire(run.lock_path(block)):
            holder = lock_holder(run.lock_path(block))
            return BlockOutcome(block, "locked", error=f"held by {holder}")
        remove_stale_temps(run, block)
        with StopRequest() as stop:
            try:
                return _train_locked(run, block, stop)
            except RunError as e:  # a write failed (no space, no permission): say so, re-raise
                with contextlib.suppress(PSMError):
                    run.write_status(block, state="failed", error=str(e))
                raise


def note_failure(run: Run, out: BlockOutcome) -> None:
    """Record a ``failed`` outcome in its block's status when the worker could not (it died),
    so that ``psm status`` shows why. A block a live worker holds is left alone."""
    if out.state != "failed" or not out.error:
        return
    rec = run.read_status(out.block) or {}
    if rec.get("state") == "failed" or lock_holder_alive(run.lock_path(out.block)):
        return
    with contextlib.suppress(PSMError):
        run.write_status(out.block, state="failed", error=out.error)


def remove_stale_temps(run: Run, block: int) -> None:
    """Delete temp files of a block's checkpoints left by a worker killed while writing one.

    Only the lock holder writes a block's checkpoint files, so call this holding the lock.
    """
    for final in (run.state_path(block), run.weights_path(block)):
        for tmp in final.parent.glob(f".{final.name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _train_locked(run: Run, block: int, stop: StopRequest) -> BlockOutcome:
    cfg = run.config.train
    problem = BlockProblem.build(run, block)
    net = problem.new_net()
    gen = problem.new_generator()
    params = dict(net.named_parameters())
    opt = make_adam(list(params.values()), cfg.lr)
    state = load_state(run, block, net)
    step, wall0 = 0, 0.0
    if state is not None:
        net.load_state_dict(state.net)
        if state.adam_m is not None and state.adam_v is not None:
            set_adam_moments(opt, params, state.adam_m, state.adam_v, state.step)
        gen.set_state(state.rng.to(torch.uint8))
        step, wall0 = state.step, state.wall_time
    truncate_metrics(run.metrics_path(block), step)
    target = run.target_steps
    names = {p: n for n, p in params.items()}
    window = _LossWindow(step)
    t_start = time.perf_counter()
    last_loss: float | None = None
    run.write_status(
        block, state="running", step=step, start_step=step, target=target,
        span=run.partition.describe(block), device=str(problem.device), error=None,
    )  # fmt: skip

    def wall() -> float:
        return wall0 + time.perf_counter() - t_start

    out_of_time = time_budget(cfg.max_seconds)

    def checkpoint(final: bool) -> None:
        moments = adam_moments(opt, names)
        m, v = moments if moments else (None, None)
        save_state(run, block, BlockState(step, net.state_dict(), m, v, gen.get_state(), wall()))
        if final:
            save_weights(run, block, net.state_dict(), step)
        run.write_status(block, checkpoint_step=step, checkpoint_time=time.time())

    def flush() -> None:
        nonlocal last_loss
        vals, start = window.flush()
        if not vals:
            return
        flat = [v[0] for v in vals]
        bad = first_nonfinite(flat, start)
        if bad is not None:
            raise BlockError(
                f"block {block}: non-finite loss ({flat[bad - start - 1]}) at step {bad}"
            )
        last_loss = float(np.mean(flat))
        append_line(
            run.metrics_path(block),
            json.dumps({"step": step, "loss": last_loss, "wall_time": round(wall(), 3)}),
        )
        run.write_status(block, step=step, last_loss=last_loss, wall_time=wall())

    try:
        net.train()
        while step < target and not out_of_time(wall()):
            if stop.is_set():
                raise _Stopped
            x_t, t, y = problem.draw_batch(gen)
            loss = problem.process.loss(net(x_t, t), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            window.losses.append(loss.detach())
            at_ckpt = step % cfg.checkpoint_every == 0
            if step % cfg.log_every == 0 or at_ckpt or step == target:
                flush()
                if at_ckpt and step < target:
                    checkpoint(final=False)
        flush()
        checkpoint(final=True)
        run.write_status(
            block, state="done", step=step, wall_time=wall(), budget_spent=step < target
        )
        return BlockOutcome(block, "done", step, last_loss)
    except BlockError as e:
        run.write_status(block, state="failed", error=str(e))
        return BlockOutcome(block, "failed", step, last_loss, str(e))
    except _Stopped:
        # between two steps: save the exact current step so that resuming loses nothing
        try:
            flush()
            checkpoint(final=False)
            run.write_status(block, state="stopped", step=step)
        except BlockError as e:
            run.write_status(block, state="failed", error=str(e))
        return BlockOutcome(block, "interrupted", step, last_loss)
