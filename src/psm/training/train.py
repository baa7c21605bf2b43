"""Training blocks: one loop for any number K >= 1 of blocks of a run.

A block is trained with Adam on fresh samples every step (appendix H). What it learns from —
its times, pairs and loss weights — is its :class:`~psm.core.objective.Objective`
(``train.objective``): by default block i of an interval partition draws ``t ~ U[t_i, t_{i+1}]``
(Algorithm 1; K = 1 is SA-DPM, Algorithm 3) and a grid block uses its fixed time ``t_i``
(Algorithm 2), with a plain MSE. Blocks at the same step can be trained together as one stacked
model (:mod:`psm.training.stack`); the loop (:func:`train_stack`) is the same for one block and
for a stack, and so are the files it writes:

* :func:`train_block` is the loop with K = 1 — the only thing the local, Ray and SLURM
  executors call per block;
* :func:`train_ensemble` runs the loop over stacks of blocks in one process.

Both are

* idempotent: a block that reached its target is skipped;
* resumable: a block continues from its last checkpoint with Adam and RNG state, so a resumed
  block ends bit-for-bit where an uninterrupted one would;
* exclusive: a lock keeps a second worker off a block being trained;
* safe: a non-finite loss stops the block with an error naming it and the step, keeping the
  last good checkpoint (the other blocks of a stack carry on); Ctrl-C / SIGTERM save a
  checkpoint at the current step.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..core.device import resolve_device
from ..core.heldout import HELDOUT_SEED, HeldoutBatch, heldout_batch, heldout_term
from ..core.objective import Batch, Objective, stack_batches
from ..data import Dataset
from ..errors import PSMError, RunError
from ..runs.atomic import append_line, atomic_write_text
from ..runs.checkpoint import (
    BlockState,
    has_moments,
    load_state,
    resume_step,
    save_state,
    save_weights,
)
from ..runs.lock import BlockLocks, lock_holder, lock_holder_alive
from ..runs.prune import drop_state, record_restart
from ..runs.run import Run
from ..runs.tensorboard import MetricWriter, add_scalars, metric_writer
from ..runs.warm_start import start_block
from .stack import NetStack, SingleNet, stack_nets
from .stop import StopRequest

SEED_INIT, SEED_DATA, SEED_GLOBAL, SEED_HELDOUT = 0, 1, 2, 3
PROGRESS_SECONDS = 2.0
"""Least seconds between two progress writes of a block's status (besides ``log_every``)."""
CPU_STACK = 16
"""Most blocks stacked at once on a CPU unless ``--max-stack`` says otherwise: past a few tens
of blocks one layer's activations of the paper MLP leave the cache (200 blocks at batch 512:
about 61 MB): stacked whole, 200 blocks trained at 0.77x the block-steps/s of 10, in stacks of
16 at 1.12x (one thread; ``psm bench stacks``, docs/benchmarks.md). Stacks of 5-20 ran alike;
16 is a chosen default, not a tuned optimum. On a GPU a group is stacked whole."""


def block_seed(seed: int, block: int, purpose: int, *more: int) -> int:
    """A 63-bit seed for one purpose (init, data, global RNG) of one block of a run (``more``:
    e.g. the step a pruned block restarts its data stream at)."""
    entropy = [seed, block, purpose, *more]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> 1)


def train_device(name: str) -> torch.device:
    """``train.device`` resolved and checked (a one-line error naming the field)."""
    try:
        return resolve_device(name)
    except PSMError as e:
        raise RunError(f"train.device: {e}") from None


@dataclass
class BlockProblem:
    """One block's training problem: its data, its objective, and its seeds.

    Attributes:
        block: the block id.
        objective: what the block learns from, built for its training times
            (``run.partition.train_range(block)``) from ``train.objective``.
    """

    run: Run
    block: int
    dataset: Dataset
    objective: Objective
    device: torch.device
    batch_size: int

    @classmethod
    def build(cls, run: Run, block: int, device: torch.device | None = None) -> BlockProblem:
        """Block ``block`` of ``run`` on ``device`` (default: the run's ``train.device``)."""
        device = device if device is not None else train_device(run.config.train.device)
        lo, hi = run.partition.train_range(block)
        objective = run.config.objective_for(block).objective(run.process, lo, hi)
        return cls(run, block, run.dataset, objective, device, run.config.train.batch_size)

    def new_net(self) -> nn.Module:
        """The block's net, initialised from its own seed (same weights in every executor), or,
        with ``train.init_from`` and no resume point yet, from the warm-start source's weights
        (:func:`psm.runs.warm_start.start_block`, which records it in the block's status)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(block_seed(self.run.config.train.seed, self.block, SEED_INIT))
            net = self.run.parts.new_net(self.block)
        net = net.to(self.device)
        warm = self.run.config.train.init_from is not None
        layout = self.run.layout
        started = layout.state(self.block).exists() or layout.weights(self.block).exists()
        if warm and not started:  # step 0: the source's (a pruned block: its own weights)
            start_block(self.run, self.block, net)
        return net

    def new_generator(self) -> torch.Generator:
        """The block's data stream: batches are a pure function of the run seed and block."""
        seed = block_seed(self.run.config.train.seed, self.block, SEED_DATA)
        return torch.Generator(device=self.device).manual_seed(seed)

    def draw_batch(self, generator: torch.Generator) -> Batch:
        """One fresh batch: data ``x0 [B, *D]`` from the block's stream, then the objective's
        times, noise and pair (eq. 29) from the same stream
        (:meth:`~psm.core.objective.Objective.draw`)."""
        x0 = self.dataset.sample(self.batch_size, generator)
        return self.objective.draw(x0, generator)


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


def make_adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """Adam (appendix H) with the fused kernel where the device supports it.

    One optimizer over a stack's tensors is K independent Adams (Adam is elementwise), so a
    block gets the same update arithmetic whether it is trained alone or stacked.
    """
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


@functools.cache
def direct_adam_matches() -> bool:
    """Whether this torch's private fused-Adam kernel, called as :func:`adam_step` calls it,
    gives ``Adam.step``'s result bit for bit (checked once per process on a tiny problem, so a
    torch whose private API differs falls back to ``opt.step()`` instead of failing)."""

    def run(direct: bool) -> list[Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(8, 3, generator=gen, requires_grad=True)]
        opt = torch.optim.Adam(params, lr=1e-2, fused=True, weight_decay=0.1)
        for i in range(3):
            params[0].grad = (params[0] * (i + 1)).sin().detach()
            if not (direct and _direct_adam(opt)):
                opt.step()
        st = opt.state[params[0]]
        return [params[0].detach(), st["exp_avg"], st["exp_avg_sq"], st["step"]]

    try:
        return all(torch.equal(a, b) for a, b in zip(run(False), run(True)))
    except Exception:  # a torch without this private kernel, or with another signature
        return False


def adam_step(opt: torch.optim.Adam) -> None:
    """``opt.step()``, calling the fused kernel directly where that is the same arithmetic.

    For a fused Adam with one parameter group (what :func:`make_adam` builds), every parameter
    with a gradient and its state already made (from the second update on, or after a
    resume), this is what ``Adam.step`` does — count the step, one ``torch._fused_adam_`` over
    the same lists with the same arguments — without its per-call Python bookkeeping (about a
    tenth of a 2D step on one CPU core, ``psm bench train``). Anything else (the first update,
    a foreach Adam, amsgrad, a grad scaler, a torch whose kernel does not match
    :func:`direct_adam_matches`) goes through ``opt.step()``.
    """
    if not (direct_adam_matches() and _direct_adam(opt)):
        opt.step()


def _direct_adam(opt: torch.optim.Adam) -> bool:
    """One fused-Adam update by the kernel itself; False (nothing done) where that is not
    ``Adam.step``'s arithmetic."""
    groups = opt.param_groups
    group = groups[0]
    if (
        len(groups) != 1
        or not group.get("fused")
        or group["amsgrad"]
        or group["differentiable"]
        or group.get("capturable")
        or getattr(opt, "grad_scale", None) is not None
        or getattr(opt, "found_inf", None) is not None
    ):
        return False
    params = group["params"]
    state = opt.state
    grads, m, v, steps = [], [], [], []
    for p in params:
        st = state.get(p)
        if p.grad is None or not st or p.grad.is_sparse:
            return False
        grads.append(p.grad)
        m.append(st["exp_avg"])
        v.append(st["exp_avg_sq"])
        steps.append(st["step"])
    beta1, beta2 = group["betas"]
    torch._foreach_add_(steps, 1)
    decoupled = group.get("decoupled_weight_decay", False)
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    kernel(
        params, grads, m, v, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
        beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
        maximize=group["maximize"], grad_scale=None, found_inf=None,
    )  # fmt: skip
    return True


def adam_moments(
    opt: torch.optim.Adam, stack: NetStack, k: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
    """Block k's Adam moments ``(exp_avg, exp_avg_sq)`` by parameter name (None before the
    first step)."""
    m, v = {}, {}
    for name, p in stack.params.items():
        st = opt.state.get(p)
        if not st:
            return None
        m[name], v[name] = stack.part(st["exp_avg"], k), stack.part(st["exp_avg_sq"], k)
    return m, v


def restore_adam(
    opt: torch.optim.Adam, stack: NetStack, states: Sequence[BlockState], step: int
) -> None:
    """Put the blocks' saved Adam moments (and the shared step count) back into ``opt``."""
    for name, p in stack.params.items():
        opt.state[p] = {
            "step": torch.tensor(float(step)),
            "exp_avg": stack.join([s.adam_m[name] for s in states]).to(p).clone(),  # type: ignore[index]
            "exp_avg_sq": stack.join([s.adam_v[name] for s in states]).to(p).clone(),  # type: ignore[index]
        }


class Recipe:
    """The optimisation recipe of ``train``: learning-rate schedule, EMA, clipping, precision.

    Args:
        cfg: the ``train`` section.
        total: the step budget the schedule decays over (the blocks' target).
        device: the training device (autocast's device type).
        decay_start: the step the decay starts from (``train.block_decay``; 0: the decay spans
            the whole target, as without a budget plan).
    """

    def __init__(self, cfg, total: int, device: torch.device, decay_start: int = 0) -> None:
        self.base_lr = cfg.lr
        self.schedule = cfg.lr_schedule
        self.warmup = cfg.warmup
        self.total = max(1, total)
        self.decay_start = min(max(0, decay_start), self.total - 1)
        self.ema = cfg.ema
        self.grad_clip = cfg.grad_clip
        self.bf16 = cfg.precision == "bf16"
        self.device_type = device.type

    def lr(self, step: int) -> float:
        """The learning rate of update ``step + 1`` (``step`` updates done): a linear warm-up
        over ``warmup`` steps, then constant, cosine or linear decay to 0 at ``total`` (from
        ``decay_start``: constant before it, the warm-up-stable-decay shape of a budget plan)."""
        warm = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        d = self.decay_start  # 0 without a plan: exactly step / total
        frac = min(max(step - d, 0) / (self.total - d), 1.0)
        if self.schedule == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * frac))
        elif self.schedule == "linear":
            decay = 1.0 - frac
        else:
            decay = 1.0
        return self.base_lr * warm * decay

    def ema_decay(self, step: int) -> float:
        """The EMA decay after ``step`` updates, warmed up as ``min(ema, (1 + s) / (10 + s))``
        so that early weights do not linger."""
        assert self.ema is not None
        return min(self.ema, (1.0 + step) / (10.0 + step))

    def autocast(self):
        """bf16 autocast of the forward when ``precision: bf16`` (losses in float32)."""
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16)


def _is_random(module: nn.Module) -> bool:
    """Whether a layer draws random numbers while training (dropout)."""
    return isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0


class StackTrainer:
    """K blocks of a run at the same step, their nets, generators and one Adam, restored from
    their checkpoints; :meth:`train_step` is one parameter update of every block.

    Args:
        run: the run.
        blocks: block ids sharing their resume step (K >= 1).

    Raises:
        CheckpointError: a checkpoint that is foreign, truncated or does not match the net.
        ValueError: blocks at different resume steps.
    """

    def __init__(self, run: Run, blocks: Sequence[int]) -> None:
        cfg = run.config.train
        self.run, self.blocks = run, list(blocks)
        if len({_schedule_key(run, b) for b in self.blocks}) > 1:
            raise ValueError(
                f"blocks {self.blocks} have different step targets or decay starts: stack them "
                "apart"
            )
        if len({run.config.net_key(b) for b in self.blocks}) > 1:
            raise ValueError(f"blocks {self.blocks} have different nets: stack them apart")
        self.device = train_device(cfg.device)
        self.problems = [BlockProblem.build(run, b, self.device) for b in self.blocks]
        self.objective = self.problems[0].objective  # scores the whole stack (Objective.loss)
        nets = [p.new_net() for p in self.problems]
        self.generators = [p.new_generator() for p in self.problems]
        states = [load_state(run, b, net) for b, net in zip(self.blocks, nets)]
        steps = {s.step if s else 0 for s in states}
        if len(steps) != 1:
            raise ValueError(f"blocks {self.blocks} are at different steps {sorted(steps)}")
        if len({s is not None and s.adam_m is not None for s in states}) > 1:
            raise ValueError(f"blocks {self.blocks}: some resume with Adam moments, some not")
        self.step = steps.pop()
        self.wall0 = [s.wall_time if s else 0.0 for s in states]
        for b, net, gen, st in zip(self.blocks, nets, self.generators, states):
            if st is not None:
                net.load_state_dict(st.net)
                if st.rng is not None:
                    gen.set_state(st.rng.to(torch.uint8))
                else:  # pruned: fresh optimizer, a data stream of its own from this step
                    gen.manual_seed(block_seed(cfg.seed, b, SEED_DATA, st.step))
                    print(record_restart(run, b, st.step), file=sys.stderr)
        self.stack = stack_nets(nets, compile=cfg.compile)
        self._params = list(self.stack.params.values())
        self.opt = make_adam(self._params, cfg.lr)
        if states[0] is not None and states[0].adam_m is not None:
            restore_adam(self.opt, self.stack, states, self.step)
        self.recipe = Recipe(
            cfg, run.config.step_target(blocks[0]), self.device, run.config.decay_start(blocks[0])
        )
        self.ema: dict[str, Tensor] | None = None
        if cfg.ema is not None:  # the averaged weights inference will use
            saved = [s.ema if s is not None else None for s in states]
            self.ema = {
                n: (self.stack.join([e[n] for e in saved]).to(p).clone()  # type: ignore[index]
                    if all(e is not None for e in saved) else p.detach().clone())
                for n, p in self.stack.params.items()
            }  # fmt: skip
        # random layers (dropout) draw from the device's global generator: seed it from the
        # first block (or restore it), so that a resumed block continues its masks exactly
        self.random_layers = any(_is_random(m) for m in nets[0].modules())
        if self.random_layers:
            saved = states[0].global_rng if states[0] is not None else None
            if saved is not None:
                self._set_global_rng(saved)
            else:
                more = [self.step] if self.step else []  # a pruned block's restart
                self._seed_global_rng(block_seed(cfg.seed, self.blocks[0], SEED_GLOBAL, *more))
        self._heldout: list[HeldoutBatch | None] | None = None  # built on first use
        self._t_start = time.perf_counter()

    def _seed_global_rng(self, seed: int) -> None:
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)

    def _set_global_rng(self, state: Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state.to(torch.uint8), self.device)
        else:
            torch.set_rng_state(state.to(torch.uint8))

    def _global_rng(self) -> Tensor | None:
        if not self.random_layers:
            return None
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def train_step(self) -> Tensor:
        """One update of every block: draw (each block's objective), forward, the objective's
        loss summed over blocks, backward, Adam.

        Returns:
            The K losses before the update, ``[K]`` (detached, left on the device).
        """
        batch = stack_batches([p.draw_batch(g) for p, g in zip(self.problems, self.generators)])
        if self.recipe.bf16:
            with self.recipe.autocast():
                out = self.stack(batch.x_t, batch.t)
        else:  # autocast disabled: the same forward, without entering the context each step
            out = self.stack(batch.x_t, batch.t)
        losses = self.objective.loss(out.float(), batch.target, batch.weight)  # [K], one per block
        for p in self._params:  # opt.zero_grad(set_to_none=True), without its bookkeeping
            p.grad = None
        losses.sum().backward()
        if self.recipe.grad_clip is not None:
            self.stack.clip_grad_norm_(self.recipe.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = self.recipe.lr(self.step)
        adam_step(self.opt)
        self.step += 1
        if self.ema is not None:
            params = list(self.stack.params.values())
            torch._foreach_lerp_(
                list(self.ema.values()), params, 1.0 - self.recipe.ema_decay(self.step)
            )
        return losses.detach()

    def weights(self, k: int) -> dict[str, Tensor]:
        """Block k's weights for inference: the EMA of its parameters when ``train.ema`` is
        set (buffers as trained), else the parameters themselves."""
        state = self.stack.net_state(k)
        if self.ema is None:
            return state
        return state | {n: self.stack.part(v, k) for n, v in self.ema.items()}

    def walls(self) -> list[float]:
        """Seconds each block has trained, this call included."""
        el = time.perf_counter() - self._t_start
        return [w + el for w in self.wall0]

    # ------------------------------------------------------------ the held-out signal
    def heldout_batches(self) -> list[HeldoutBatch | None]:
        """Each block's fixed held-out batch (:mod:`psm.core.heldout`), built once, on the
        training device; None for a grid block with no segment (its cell lies below t0).

        The points are ``dataset.test_set(train.heldout_points, seed=HELDOUT_SEED)``: fresh
        points for synthetic data (a seed other than ``eval.test_seed``), the first images of
        the test split for finite image sets, a seeded subset of the held-out share for point
        files. Times and noise come from the block's own generator
        (``block_seed(seed, block, SEED_HELDOUT)``); neither the training generators nor the
        global RNG are touched, so training is the same with and without the signal.
        """
        if self._heldout is None:
            cfg, run = self.run.config.train, self.run
            x0 = self.problems[0].dataset.test_set(cfg.heldout_points, seed=HELDOUT_SEED)
            segments = {s.block: s for s in run.partition.segments()}
            grid = run.partition.kind == "grid"
            self._heldout = []
            for b in self.blocks:
                seg = segments.get(b)
                if seg is None or x0.shape[0] < 2:
                    self._heldout.append(None)
                    continue
                gen = torch.Generator().manual_seed(block_seed(cfg.seed, b, SEED_HELDOUT))
                tau = run.partition.train_range(b)[0] if grid else None
                batch = heldout_batch(
                    run.process, seg.t_lo, seg.t_hi, x0, gen, block=b, net_time=tau
                )
                self._heldout.append(batch.to(self.device))
        return self._heldout

    def heldout(self) -> dict[int, float]:
        """Each block's held-out denoising bound now (its KL term up to a network-free
        constant, nats; :func:`psm.core.heldout.heldout_term`), by stack index.

        Measured with the weights inference uses (the EMA when ``train.ema`` is set), the nets
        in evaluation mode and without autocast (float32), under ``no_grad``; the nets go back
        to training mode after. Grid blocks are measured with the paper's constant field.
        """
        batches = self.heldout_batches()
        have = [k for k, b in enumerate(batches) if b is not None]
        if not have:
            return {}
        fill = batches[have[0]]
        assert fill is not None
        xs = torch.stack([(b or fill).x_t for b in batches])  # [K, N, *D]
        ts = torch.stack([(b or fill).t_net for b in batches])  # [K, N]
        chunk = max(1, self.run.config.train.batch_size)
        self.stack.train(False)
        try:
            with torch.no_grad():
                out = torch.cat(
                    [self._eval_forward(xs[:, i : i + chunk], ts[:, i : i + chunk])
                     for i in range(0, xs.shape[1], chunk)], dim=1,
                )  # fmt: skip
        finally:
            self.stack.train(True)
        # each block's output read with its own prediction (objective.process)
        return {
            k: heldout_term(self.problems[k].objective.process, batches[k], out[k])[0]  # type: ignore[arg-type]
            for k in have
        }

    def _eval_forward(self, x: Tensor, t: Tensor) -> Tensor:
        """The stack's forward ``[K, B, *D], [K, B] -> [K, B, *D]`` with inference weights
        (the EMA when kept), leaving the trained parameters untouched."""
        stack = self.stack
        if isinstance(stack, SingleNet):  # the plain module (never the compiled one)
            if self.ema is None:
                return stack.net(x[0], t[0]).unsqueeze(0)
            return functional_call(stack.net, self.ema, (x[0], t[0])).unsqueeze(0)
        if self.ema is None:
            return stack(x, t)
        trained = stack.params  # the stacked forward reads ``params`` at call time
        stack.params = self.ema
        try:
            return stack(x, t)
        finally:
            stack.params = trained

    def block_state(self, k: int) -> BlockState:
        """Block k's resume point (unstacked views; the checkpoint copies them)."""
        moments = adam_moments(self.opt, self.stack, k)
        m, v = moments if moments else (None, None)
        ema = {n: self.stack.part(e, k) for n, e in self.ema.items()} if self.ema else None
        return BlockState(
            self.step, self.stack.net_state(k), m, v, self.generators[k].get_state(),
            self.walls()[k], self._global_rng(), ema,
        )  # fmt: skip

    def checkpoint(self, *, final: bool, only: Sequence[int] | None = None) -> None:
        """Write the resume point (and, when ``final``, the weights) of each block."""
        keep = self.run.config.train.keep_state
        for k, b in enumerate(self.blocks):
            if only is not None and k not in only:
                continue
            if keep or not final:  # keep_state false: the done block's state is dropped next
                save_state(self.run, b, self.block_state(k))
            if final:
                save_weights(self.run, b, self.weights(k), self.step)
            self.run.ledger.write(b, checkpoint_step=self.step, checkpoint_time=time.time())


@dataclass
class _LossWindow:
    """Per-step losses since the last flush, kept as tensors so GPU steps stay asynchronous."""

    start_step: int
    losses: list[Tensor] = field(default_factory=list)

    def flush(self) -> tuple[np.ndarray, int]:
        """Losses as a ``[steps, K]`` float64 array and the step of the first entry."""
        if not self.losses:
            return np.zeros((0, 0)), self.start_step
        vals = torch.stack(self.losses).reshape(len(self.losses), -1).double().cpu().numpy()
        start = self.start_step
        self.start_step += len(self.losses)
        self.losses = []
        return vals, start


def first_nonfinite(values: Sequence[float], start: int) -> int | None:
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


def time_budget(max_seconds: float | None):
    """A predicate ``wall_time -> bool`` that says when a block's time budget is spent."""
    if max_seconds is None:
        return lambda wall: False
    return lambda wall: wall >= max_seconds


def train_stack(run: Run, blocks: Sequence[int], stop: StopRequest) -> list[BlockOutcome]:
    """Train blocks that share a resume step, as one stack, to the run's step target.

    The caller holds the blocks' locks. Returns one outcome per block, in the order given.
    """
    cfg = run.config.train
    with metric_writer(run, blocks) as tb, torch.random.fork_rng(devices=_cuda_index(cfg.device)):
        trainer = StackTrainer(run, blocks)
        return _train_loop(run, trainer, stop, tb)


def _cuda_index(device: str) -> list[int]:
    """The CUDA device whose global generator :func:`train_stack` forks (none on CPU)."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        return []
    if dev.type != "cuda" or not torch.cuda.is_available():
        return []
    return [dev.index if dev.index is not None else torch.cuda.current_device()]


def _train_loop(
    run: Run, tr: StackTrainer, stop: StopRequest, tb: MetricWriter
) -> list[BlockOutcome]:
    cfg = run.config.train
    blocks, target = tr.blocks, run.config.step_target(tr.blocks[0])
    for b in blocks:
        truncate_metrics(run.layout.metrics(b), tr.step)
        run.ledger.write(
            b, state="running", step=tr.step, start_step=tr.step, target=target,
            span=run.partition.describe(b), device=str(tr.device), error=None,
        )  # fmt: skip
    window = _LossWindow(tr.step)
    last_loss: list[float | None] = [None] * len(blocks)
    progress_every = PROGRESS_SECONDS * max(1.0, len(blocks) / 100)  # many blocks: fewer writes
    last_progress = time.monotonic()

    def flush(heldout: dict[int, float] | None = None) -> list[int]:
        """Log the window (with the held-out values measured at this step, by stack index);
        return the stack indices whose loss went non-finite."""
        vals, start = window.flush()
        if not vals.size:
            if heldout:  # measured at a step already logged: a line of its own
                log_heldout(heldout)
            return []
        bad = []
        walls = tr.walls()
        for k, b in enumerate(blocks):
            at = first_nonfinite(vals[:, k].tolist(), start)
            if at is not None:
                bad.append(k)
                msg = f"block {b}: non-finite loss ({vals[at - start - 1, k]}) at step {at}"
                run.ledger.write(b, state="failed", error=msg)
                continue
            last_loss[k] = float(vals[:, k].mean())
            line = {"step": tr.step, "loss": last_loss[k], "wall_time": round(walls[k], 3)}
            signal = {}
            if heldout and k in heldout:
                line["heldout"] = heldout[k]
                signal = {"heldout": heldout[k], "heldout_step": tr.step}
            append_line(run.layout.metrics(b), json.dumps(line))
            run.ledger.write(b, step=tr.step, last_loss=last_loss[k], wall_time=walls[k],
                             **signal)  # fmt: skip
        add_scalars(tb, {f"loss/block_{b:04d}": last_loss[k] for k, b in enumerate(blocks)
                         if k not in bad}, tr.step)  # fmt: skip
        if heldout:
            add_scalars(tb, {f"heldout/block_{blocks[k]:04d}": v for k, v in heldout.items()
                             if k not in bad}, tr.step)  # fmt: skip
        return bad

    def log_heldout(heldout: dict[int, float]) -> None:
        """Held-out values at a step whose losses are logged already: a metrics line each."""
        walls = tr.walls()
        for k, v in heldout.items():
            line = {"step": tr.step, "heldout": v, "wall_time": round(walls[k], 3)}
            append_line(run.layout.metrics(blocks[k]), json.dumps(line))
            run.ledger.write(blocks[k], heldout=v, heldout_step=tr.step)
        add_scalars(tb, {f"heldout/block_{blocks[k]:04d}": v for k, v in heldout.items()},
                    tr.step)  # fmt: skip

    def split_off(bad: list[int]) -> list[BlockOutcome]:
        """Failed blocks leave the stack (their last good checkpoint stays); the healthy ones
        are saved at this step and carry on in a new stack."""
        healthy = [k for k in range(len(blocks)) if k not in bad]
        tr.checkpoint(final=False, only=healthy)
        outs = [
            BlockOutcome(blocks[k], "failed", tr.step, last_loss[k],
                         (run.ledger.read(blocks[k]) or {}).get("error"))
            for k in bad
        ]  # fmt: skip
        if healthy:
            outs += train_stack(run, [blocks[k] for k in healthy], stop)
        return outs

    out_of_time = time_budget(cfg.max_seconds)
    # the held-out signal (psm.core.heldout): every ``heldout_every`` steps and at the end of
    # the call (what a budget allocator reads), written into the metrics line of that step
    every = cfg.heldout_every
    heldout_at: int | None = None  # the step last measured
    while tr.step < target and not out_of_time(max(tr.walls())):
        if stop.is_set():
            bad = flush()
            if bad:
                return split_off(bad)
            tr.checkpoint(final=False)
            for b in blocks:
                run.ledger.write(b, state="stopped", step=tr.step)
            return [
                BlockOutcome(b, "interrupted", tr.step, last_loss[k]) for k, b in enumerate(blocks)
            ]
        window.losses.append(tr.train_step())
        step = tr.step
        at_ckpt = step % cfg.checkpoint_every == 0
        at_heldout = every > 0 and (step % every == 0 or step == target)
        if step % cfg.log_every == 0 or at_ckpt or step == target or at_heldout:
            heldout = tr.heldout() if at_heldout else None
            heldout_at = step if at_heldout else heldout_at
            bad = flush(heldout)
            if bad:
                return split_off(bad)
            if at_ckpt and step < target:
                tr.checkpoint(final=False)
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress >= progress_every:
            for b, w in zip(blocks, tr.walls()):  # a progress mark between two log lines
                run.ledger.write(b, step=step, wall_time=w)
            last_progress = time.monotonic()
    bad = flush(tr.heldout() if every > 0 and heldout_at != tr.step else None)
    if bad:
        return split_off(bad)
    tr.checkpoint(final=True)
    walls = tr.walls()  # the final wall time: ledger.done compares it with a time budget
    for k, b in enumerate(blocks):
        run.ledger.write(
            b, state="done", step=tr.step, wall_time=walls[k], budget_spent=tr.step < target
        )
        if not cfg.keep_state:  # only the final weights stay (as psm prune)
            drop_state(run, b)
    return [BlockOutcome(b, "done", tr.step, last_loss[k]) for k, b in enumerate(blocks)]


# ------------------------------------------------------------------------------ drivers
def train_ensemble(
    run_dir: str | Path | Run,
    blocks: Sequence[int] | None = None,
    *,
    max_stack: int | None = None,
) -> list[BlockOutcome]:
    """Train ``blocks`` of a run (default: all) in this process, in stacks of blocks at the
    same resume step (``max_stack=1``: one block at a time).

    Args:
        run_dir: the run directory or an open run.
        blocks: block ids; finished ones are skipped, ones locked by a live worker left alone.
        max_stack: most blocks in one stack (memory bound); None stacks all of a step group.

    Returns:
        One :class:`BlockOutcome` per requested block, in block order.
    """
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    ids = list(range(run.num_blocks)) if blocks is None else sorted(set(blocks))
    run.check_block_ids(ids)
    outcomes: dict[int, BlockOutcome] = {}
    for b in ids:
        if run.ledger.done(b, run.config.step_target(b)):
            rec = run.ledger.read(b) or {}
            outcomes[b] = BlockOutcome(b, "skipped", rec.get("step", 0), rec.get("last_loss"))
    todo = [b for b in ids if b not in outcomes]
    if not todo:
        return [outcomes[b] for b in ids]
    with BlockLocks() as locks, StopRequest() as stop:
        held = []
        for b in todo:
            if locks.acquire(run.layout.lock(b)):
                held.append(b)
                remove_stale_temps(run, b)
            else:
                outcomes[b] = BlockOutcome(
                    b, "locked", error=f"held by {lock_holder(run.layout.lock(b))}"
                )
        for group in _step_groups(run, held, max_stack):
            if stop.is_set():
                for b in group:
                    outcomes[b] = BlockOutcome(b, "interrupted", error="not started")
                continue
            try:
                for out in train_stack(run, group, stop):
                    outcomes[out.block] = out
            except RunError as e:  # a write failed (no space, no permission): say so, re-raise
                for b in group:
                    with contextlib.suppress(PSMError):
                        run.ledger.write(b, state="failed", error=str(e))
                raise
    return [outcomes[b] for b in ids]


def train_block(run_dir: str | Path | Run, block: int) -> BlockOutcome:
    """Train one block of a run to its step target: the loop with K = 1.

    Args:
        run_dir: the run directory (or an open :class:`~psm.runs.run.Run`).
        block: the block id, ``0 <= block < K``.

    Returns:
        The :class:`BlockOutcome`. Bad input (missing run, foreign checkpoint) raises a
        :class:`~psm.errors.PSMError`; a non-finite loss returns ``state="failed"``.
    """
    return train_ensemble(run_dir, [block], max_stack=1)[0]


def _step_groups(run: Run, blocks: list[int], max_stack: int | None) -> list[list[int]]:
    """Blocks grouped by their resume step (so Adam's step count is shared) and step target
    (a stack trains to one target), then chunked into stacks of at most ``max_stack`` (None: at
    most :data:`CPU_STACK` on a CPU, all of a group on a GPU). Stacks of one group train one
    after another; a block's result does not depend on the stack it is in (its own generator,
    per-block arithmetic)."""
    by_step: dict[tuple[int, bool, int, int, str], list[int]] = defaultdict(list)
    for b in blocks:  # a pruned block (fresh optimizer) never stacks with one with moments;
        # blocks with different nets (``blocks:`` overrides) train one stack per net
        key = (resume_step(run, b), has_moments(run, b), *_schedule_key(run, b))
        by_step[(*key, run.config.net_key(b))].append(b)
    if max_stack is None and train_device(run.config.train.device).type == "cpu":
        max_stack = CPU_STACK
    groups = []
    for step in sorted(by_step):
        groups += stack_chunks(by_step[step], max_stack)
    return groups


def stack_chunks(blocks: list[int], size: int | None) -> list[list[int]]:
    """``blocks`` in consecutive stacks of at most ``size`` (None: one stack), as equal in size
    as they can be (200 blocks at 16: 13 stacks of 15 or 16, not 12 of 16 and one of 8)."""
    if not blocks:
        return []
    n = -(-len(blocks) // size) if size else 1
    cuts = [round(i * len(blocks) / n) for i in range(n + 1)]
    return [blocks[a:b] for a, b in itertools.pairwise(cuts)]


def _schedule_key(run: Run, block: int) -> tuple[int, int]:
    """What a stack's blocks must share besides their step: the step target and the step a
    decaying learning rate starts to decay from."""
    return run.config.step_target(block), run.config.decay_start(block)


def note_failure(run: Run, out: BlockOutcome) -> None:
    """Record a ``failed`` outcome in its block's status when the worker could not (it died),
    so that ``psm status`` shows why. A block a live worker holds is left alone."""
    if out.state != "failed" or not out.error:
        return
    rec = run.ledger.read(out.block) or {}
    if rec.get("state") == "failed" or lock_holder_alive(run.layout.lock(out.block)):
        return
    with contextlib.suppress(PSMError):
        run.ledger.write(out.block, state="failed", error=out.error)


def remove_stale_temps(run: Run, block: int) -> None:
    """Delete temp files of a block's checkpoints left by a worker killed while writing one.

    Only the lock holder writes a block's checkpoint files, so call this holding the lock.
    """
    for final in (run.layout.state(block), run.layout.weights(block)):
        for tmp in final.parent.glob(f".{final.name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
