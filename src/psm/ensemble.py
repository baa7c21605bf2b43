"""The ensemble trainer: many blocks of one run trained in ONE process with stacked parameters.

The K block nets are stacked with :func:`torch.func.stack_module_state` and evaluated with
``vmap(functional_call)``, so one batched forward/backward serves every block. It is the same
mathematics as training the blocks one by one:

* each block draws its own batch from its own generator, with its own time range;
* the per-block losses are SUMMED (never averaged), so block k's gradient is exactly the
  gradient of its own loss;
* Adam is elementwise, so one Adam over the stacked tensors is K independent Adams; blocks are
  stacked only with blocks at the same step, so the bias corrections agree too;
* there is no clipping or any other coupling across blocks.

Checkpoints are unstacked and written per block in the same format as :func:`psm.train.
train_block`, so any executor can resume any block. A block whose loss turns non-finite is
marked failed (its last good checkpoint stays) and the others carry on without it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from .atomic import append_line
from .checkpoint import BlockState, load_state, resume_step, save_state, save_weights
from .data import Dataset
from .errors import PSMError, RunError
from .lock import BlockLocks, lock_holder
from .run import Run
from .train import (
    BlockOutcome,
    BlockProblem,
    StopRequest,
    _LossWindow,
    first_nonfinite,
    make_adam,
    remove_stale_temps,
    time_budget,
    truncate_metrics,
)


def train_ensemble(
    run_dir: str | Path | Run,
    blocks: list[int] | None = None,
    *,
    max_stack: int | None = None,
) -> list[BlockOutcome]:
    """Train ``blocks`` of a run (default: all) stacked in this process.

    Args:
        run_dir: the run directory or an open run.
        blocks: block ids; finished ones are skipped, ones locked by a live worker left alone.
        max_stack: most blocks in one stack (memory bound); None stacks all of a step group.

    Returns:
        One :class:`~psm.train.BlockOutcome` per requested block, in block order.
    """
    run = run_dir if isinstance(run_dir, Run) else Run.open(run_dir)
    ids = list(range(run.num_blocks)) if blocks is None else sorted(set(blocks))
    run.check_block_ids(ids)
    outcomes: dict[int, BlockOutcome] = {}
    for b in ids:
        if run.is_done(b):
            rec = run.read_status(b) or {}
            outcomes[b] = BlockOutcome(b, "skipped", rec.get("step", 0), rec.get("last_loss"))
    todo = [b for b in ids if b not in outcomes]
    if not todo:
        return [outcomes[b] for b in ids]
    with BlockLocks() as locks, StopRequest() as stop:
        held = []
        for b in todo:
            if locks.acquire(run.lock_path(b)):
                held.append(b)
                remove_stale_temps(run, b)
            else:
                outcomes[b] = BlockOutcome(
                    b, "locked", error=f"held by {lock_holder(run.lock_path(b))}"
                )
        dataset = run.config.build_dataset()
        for group in _step_groups(run, held, max_stack):
            if stop.is_set():
                for b in group:
                    outcomes[b] = BlockOutcome(b, "interrupted", error="not started")
                continue
            try:
                for out in _train_stack(run, group, dataset, stop):
                    outcomes[out.block] = out
            except RunError as e:  # a write failed (no space, no permission): say so, re-raise
                for b in group:
                    with contextlib.suppress(PSMError):
                        run.write_status(b, state="failed", error=str(e))
                raise
    return [outcomes[b] for b in ids]


def stacked_forward(net: nn.Module):
    """``f(params, buffers, x [K, B, *D], t [K, B]) -> [K, B, *D]`` for K stacked copies of
    ``net``'s architecture: the net's own ``stacked_forward`` (batched matmuls) when it has one,
    else ``vmap(functional_call)`` (any module without batch-coupled layers)."""
    if hasattr(net, "stacked_forward"):
        template = net

        def own(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
            return template.stacked_forward(p, x, t)

        return own
    base = copy.deepcopy(net).to("meta")

    def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        return functional_call(base, (p, b), (x, t))

    return vmap(one)


def _step_groups(run: Run, blocks: list[int], max_stack: int | None) -> list[list[int]]:
    """Blocks grouped by their resume step (so Adam's step count is shared), then chunked."""
    by_step: dict[int, list[int]] = defaultdict(list)
    for b in blocks:
        by_step[resume_step(run, b)].append(b)
    size = max_stack or len(blocks) or 1
    groups = []
    for step in sorted(by_step):
        bs = by_step[step]
        groups += [bs[i : i + size] for i in range(0, len(bs), size)]
    return groups


def _train_stack(
    run: Run, blocks: list[int], dataset: Dataset, stop: StopRequest
) -> list[BlockOutcome]:
    """Train blocks that share a resume step, stacked, to the run's target."""
    cfg = run.config.train
    problems = [BlockProblem.build(run, b, dataset) for b in blocks]
    nets = [p.new_net() for p in problems]
    gens = [p.new_generator() for p in problems]
    states = [load_state(run, b, n) for b, n in zip(blocks, nets)]
    step = states[0].step if states[0] else 0
    wall0 = [s.wall_time if s else 0.0 for s in states]
    for net, gen, st in zip(nets, gens, states):
        if st is not None:
            net.load_state_dict(st.net)
            gen.set_state(st.rng.to(torch.uint8))
    params, buffers = stack_module_state(nets)
    batched = stacked_forward(nets[0])
    opt = make_adam(list(params.values()), cfg.lr)
    if states[0] is not None and states[0].adam_m is not None:
        for name, p in params.items():
            opt.state[p] = {
                "step": torch.tensor(float(step)),
                "exp_avg": torch.stack([s.adam_m[name] for s in states]).to(p),
                "exp_avg_sq": torch.stack([s.adam_v[name] for s in states]).to(p),
            }
    for b in blocks:
        truncate_metrics(run.metrics_path(b), step)
        run.write_status(
            b, state="running", step=step, start_step=step, target=run.target_steps,
            span=run.partition.describe(b), device=str(problems[0].device), error=None,
        )  # fmt: skip

    target = run.target_steps
    window = _LossWindow(step)
    last_loss: list[float | None] = [None] * len(blocks)
    t_start = time.perf_counter()

    def walls() -> list[float]:
        el = time.perf_counter() - t_start
        return [w + el for w in wall0]

    def block_state(k: int) -> BlockState:
        st = opt.state.get(params[next(iter(params))])
        m = {n: opt.state[p]["exp_avg"][k] for n, p in params.items()} if st else None
        v = {n: opt.state[p]["exp_avg_sq"][k] for n, p in params.items()} if st else None
        net_k = {n: p[k] for n, p in params.items()} | {n: b[k] for n, b in buffers.items()}
        return BlockState(step, net_k, m, v, gens[k].get_state(), walls()[k])

    def checkpoint(final: bool, only: list[int] | None = None) -> None:
        for k, b in enumerate(blocks):
            if only is not None and k not in only:
                continue
            st = block_state(k)
            save_state(run, b, st)
            if final:
                save_weights(run, b, st.net, step)
            run.write_status(b, checkpoint_step=step, checkpoint_time=time.time())

    def flush() -> list[int]:
        """Log the window; return the stack indices whose loss went non-finite."""
        vals, start = window.flush()
        if not vals:
            return []
        arr = np.asarray(vals)  # [steps, K]
        bad = []
        w = walls()
        for k, b in enumerate(blocks):
            at = first_nonfinite(arr[:, k].tolist(), start)
            if at is not None:
                bad.append(k)
                msg = f"block {b}: non-finite loss ({arr[at - start - 1, k]}) at step {at}"
                run.write_status(b, state="failed", error=msg)
                continue
            last_loss[k] = float(arr[:, k].mean())
            line = {"step": step, "loss": last_loss[k], "wall_time": round(w[k], 3)}
            append_line(run.metrics_path(b), json.dumps(line))
            run.write_status(b, step=step, last_loss=last_loss[k], wall_time=w[k])
        return bad

    def split_off(bad: list[int]) -> list[BlockOutcome]:
        """Failed blocks leave the stack (their last good checkpoint stays); the healthy ones
        are saved at this step and carry on in a new stack."""
        healthy = [k for k in range(len(blocks)) if k not in bad]
        checkpoint(final=False, only=healthy)
        outs = [
            BlockOutcome(
                blocks[k], "failed", step, last_loss[k], run.read_status(blocks[k])["error"]
            )
            for k in bad
        ]
        if healthy:
            outs += _train_stack(run, [blocks[k] for k in healthy], dataset, stop)
        return outs

    out_of_time = time_budget(cfg.max_seconds)
    while step < target and not out_of_time(max(walls())):
        if stop.is_set():
            bad = flush()
            if bad:
                return split_off(bad)
            checkpoint(final=False)
            for b in blocks:
                run.write_status(b, state="stopped", step=step)
            return [
                BlockOutcome(b, "interrupted", step, last_loss[k]) for k, b in enumerate(blocks)
            ]
        batches = [p.draw_batch(g) for p, g in zip(problems, gens)]
        x_t = torch.stack([bt[0] for bt in batches])
        t = torch.stack([bt[1] for bt in batches])
        y = torch.stack([bt[2] for bt in batches])
        out = batched(params, buffers, x_t, t)
        losses = ((out - y) ** 2).mean(dim=tuple(range(1, out.dim())))  # [K], one per block
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()
        step += 1
        window.losses.append(losses.detach())
        at_ckpt = step % cfg.checkpoint_every == 0
        if step % cfg.log_every == 0 or at_ckpt or step == target:
            bad = flush()
            if bad:
                return split_off(bad)
            if at_ckpt and step < target:
                checkpoint(final=False)
    bad = flush()
    if bad:
        return split_off(bad)
    checkpoint(final=True)
    w = walls()  # the final wall time: is_done compares it with a time budget
    for k, b in enumerate(blocks):
        run.write_status(b, state="done", step=step, wall_time=w[k], budget_spent=step < target)
    return [BlockOutcome(b, "done", step, last_loss[k]) for k, b in enumerate(blocks)]
