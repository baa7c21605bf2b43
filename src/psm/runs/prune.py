"""Runs that fit on a disk: what a run's blocks will take, and dropping the resume points of
done blocks.

Every block keeps two checkpoints (:mod:`psm.runs.checkpoint`): its final weights (what
inference reads) and its resume point (weights, Adam's two moments, the EMA when
``train.ema`` is set, RNG states), about four times the weights with an EMA. A done block needs
its resume point only to be trained further, so it can go:

* :func:`predict_disk` says, from the net's parameter count and without training, how large
  each block's files will be (``psm train --dry-run``);
* :func:`prune_run` deletes the resume points of done blocks, never of unfinished ones, and
  records ``pruned`` in their status (``psm prune``); ``train.keep_state: false`` does the same
  as each block finishes (:func:`drop_state`, called by the trainer);
* a pruned block trained further restarts from its final weights at their step with a fresh
  optimizer (:func:`psm.runs.checkpoint.load_state`, :func:`record_restart`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import PSMError, RunError
from .checkpoint import FORMAT, weights_step
from .config import RunConfig
from .lock import BlockLocks, lock_holder, lock_holder_alive

if TYPE_CHECKING:
    from .run import Run
    from .run_parts import Parts

__all__ = [
    "BlockDisk",
    "PruneReport",
    "drop_state",
    "format_bytes",
    "predict_disk",
    "prune_run",
    "record_restart",
    "restart_phrase",
    "safetensors_size",
]

# ------------------------------------------------------------------------------ sizes
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
CPU_RNG_BYTES = 5056
"""Bytes of a CPU generator's state (Mersenne Twister); a CUDA generator's is 16."""
STATUS_BYTES = 600
"""A block's status record (JSON), roughly."""
METRIC_LINE_BYTES = 64
"""One metrics line (step, loss, wall time), roughly; a held-out value adds ``HELDOUT_BYTES``."""
HELDOUT_BYTES = 28
TB_SCALAR_BYTES = 90
"""One scalar in a TensorBoard event file, roughly (when TensorBoard is installed)."""


def format_bytes(n: float) -> str:
    """``n`` bytes in decimal units with three significant digits: ``254 MB``, ``1.02 GB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            break
        n /= 1000.0
    if unit == "B":
        return f"{int(n)} B"
    return f"{n:.3g} {unit}" if n < 100 else f"{n:.0f} {unit}"


def safetensors_size(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                     metadata: dict[str, str]) -> int:  # fmt: skip
    """The size in bytes of the safetensors file holding ``tensors`` (name: dtype, shape) and
    ``metadata``: 8 bytes of header length, the JSON header padded to 8 bytes, the data."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype, device="meta").element_size()
        header[name] = {"dtype": _DTYPES.get(dtype, "F32"), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + len(text) + (-len(text)) % 8 + offset


@dataclass(frozen=True)
class BlockDisk:
    """The disk one block takes once trained, in bytes.

    Attributes:
        block: the block id.
        weights: its final weights file (``blocks/NNNN.safetensors``).
        state: its resume point (``blocks/NNNN.state.safetensors``: weights, Adam moments, the
            EMA when ``train.ema`` is set, RNG states).
        logs: its metrics lines, status record and TensorBoard scalars (rough).
    """

    block: int
    weights: int
    state: int
    logs: int

    @property
    def total(self) -> int:
        """With its resume point."""
        return self.weights + self.state + self.logs

    @property
    def pruned(self) -> int:
        """After pruning: the weights and the logs."""
        return self.weights + self.logs


def _meta_net(parts: Parts, block: int | None = None) -> nn.Module:
    """Block ``block``'s net without its memory (meta device; CPU if a net cannot be built so)."""
    _ = parts.shape  # the data's shape first: the data are not built on the meta device
    try:
        with torch.device("meta"):
            return parts.new_net(block)
    except (RuntimeError, NotImplementedError, TypeError):
        return parts.new_net(block)


def _rng_bytes(device: str) -> int:
    from ..core.device import resolve_device

    try:
        kind = resolve_device(device).type
    except PSMError:  # a device not here: size as on the CPU
        kind = "cpu"
    return 16 if kind == "cuda" else CPU_RNG_BYTES


def _multiples(t: int, *every: int) -> int:
    """How many of the steps 1..t are multiples of at least one of ``every`` (inclusion and
    exclusion over their least common multiples)."""
    every = tuple(e for e in every if e > 0)
    total = 0
    for mask in range(1, 1 << len(every)):
        chosen = [e for i, e in enumerate(every) if mask >> i & 1]
        total += (-1) ** (len(chosen) + 1) * (t // math.lcm(*chosen))
    return total


def _log_bytes(config: RunConfig, steps: int) -> int:
    """A block's metrics, status and TensorBoard bytes after ``steps`` steps (rough)."""
    tr = config.train
    he = tr.heldout_every
    lines = _multiples(steps, tr.log_every, tr.checkpoint_every, he)
    lines += 0 if steps % tr.log_every == 0 or steps % tr.checkpoint_every == 0 else 1
    heldout = 0 if he <= 0 else steps // he + (1 if steps % he else 0)
    tb = TB_SCALAR_BYTES * (lines + heldout) if importlib.util.find_spec("tensorboard") else 0
    return STATUS_BYTES + METRIC_LINE_BYTES * lines + HELDOUT_BYTES * heldout + tb


def predict_disk(config: RunConfig, parts: Parts, blocks: list[int]) -> list[BlockDisk]:
    """Each block's files once trained to its target, predicted from the net's tensors and
    what :mod:`psm.runs.checkpoint` writes (headers and metadata included), without training.

    Args:
        config: the run's config.
        parts: its parts (the data's shape and the net builder).
        blocks: the block ids.
    """
    rng = (torch.uint8, (_rng_bytes(config.train.device),))
    partition = parts.partition
    nets: dict[str, tuple[dict, dict, bool]] = {}  # by net spec (``blocks:`` may differ)
    out = []
    for b in blocks:
        key = config.net_key(b)
        if key not in nets:
            net = _meta_net(parts, b)
            nets[key] = (
                {k: (v.dtype, tuple(v.shape)) for k, v in net.state_dict().items()},
                {k: (v.dtype, tuple(v.shape)) for k, v in net.named_parameters()},
                any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
                    for m in net.modules()),
            )  # fmt: skip
        state, params, dropout = nets[key]
        steps = config.step_target(b)
        meta = {"format": FORMAT, "config_hash": "0" * 16, "block": str(b), "step": str(steps),
                "net": config.net_for(b).name, "span": partition.describe(b)}  # fmt: skip
        resume = {f"net.{k}": v for k, v in state.items()}
        resume |= {f"adam_m.{k}": v for k, v in params.items()}
        resume |= {f"adam_v.{k}": v for k, v in params.items()}
        resume["rng"] = rng
        if dropout:
            resume["rng_global"] = rng
        if config.train.ema is not None:
            resume |= {f"ema.{k}": v for k, v in params.items()}
        wall = {"wall_time": repr(12345.678901234567)}  # a typical repr's length
        out.append(BlockDisk(
            b, safetensors_size(state, meta), safetensors_size(resume, meta | wall),
            _log_bytes(config, steps),
        ))  # fmt: skip
    return out


# ------------------------------------------------------------------------------ pruning
def restart_phrase(config: RunConfig) -> str:
    """What training a pruned block further starts with, in words."""
    ema = "; the EMA restarts from those weights" if config.train.ema is not None else ""
    return f"a fresh optimizer (new Adam moments{ema}) and a new data stream"


def drop_state(run: Run, block: int) -> int:
    """Delete a done block's resume point (and temp files a killed writer left of it), and
    record ``pruned`` in its status. The caller holds the block's lock (or is its trainer) and
    has checked that the block is done.

    Returns:
        The bytes freed (0 when there was nothing to delete).
    """
    final = run.layout.state(block)
    freed = 0
    for path in (final, *final.parent.glob(f".{final.name}.*.tmp")):
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise RunError(f"cannot remove {path}: {e.strerror}") from None
        freed += size
    run.ledger.write(block, pruned=True)
    return freed


def record_restart(run: Run, block: int, step: int) -> str:
    """Record in a block's status that it restarts from its final weights with a fresh
    optimizer at ``step`` (a pruned block trained further), and return the line to print."""
    rec = run.ledger.read(block) or {}
    restarts = [*rec.get("optimizer_restarts", []), step]
    run.ledger.write(block, pruned=False, optimizer_restarts=restarts)
    return (
        f"psm: block {block} has no resume point (pruned): it continues from its final weights "
        f"at step {step} with {restart_phrase(run.config)}"
    )


@dataclass
class PruneReport:
    """What :func:`prune_run` did (or, dry, would do).

    Attributes:
        freed: bytes freed by block (done blocks that had a resume point).
        steps: the step of each pruned block's final weights.
        unfinished: blocks kept as they are: not done.
        already: done blocks with no resume point left (pruned before).
        dry_run: nothing was deleted.
    """

    freed: dict[int, int] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    unfinished: list[int] = field(default_factory=list)
    already: list[int] = field(default_factory=list)
    dry_run: bool = False

    @property
    def total(self) -> int:
        return sum(self.freed.values())


def _state_bytes(path: Path) -> int:
    size = 0
    for p in (path, *path.parent.glob(f".{path.name}.*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            size += p.stat().st_size
    return size


def prune_run(run: Run, blocks: list[int] | None = None, *, dry_run: bool = False) -> PruneReport:
    """Delete the resume points of a run's done blocks (of ``blocks``, default all).

    A block is pruned only when it is done at its own recorded target with readable final
    weights of this run; unfinished blocks are never touched. The blocks to prune are locked
    while their files go, so a worker cannot start extending one meanwhile.

    Args:
        run: the run.
        blocks: block ids (default: all).
        dry_run: say what would be freed; delete and write nothing.

    Raises:
        RunError: one of ``blocks`` is being trained (a live lock holder), or a file cannot be
            removed.
        CheckpointError: a done block's weights are unreadable or foreign (nothing deleted).
    """
    ids = list(range(run.num_blocks)) if blocks is None else sorted(set(blocks))
    run.check_block_ids(ids)
    busy = [b for b in ids if lock_holder_alive(run.layout.lock(b))]
    if busy:
        raise RunError(_busy_line(run, busy))
    report = PruneReport(dry_run=dry_run)
    todo = []
    for b in ids:
        if not run.ledger.done(b):
            report.unfinished.append(b)
        elif not run.layout.state(b).exists():
            report.already.append(b)
        else:
            report.steps[b] = weights_step(run, b)  # readable weights first: nothing is lost
            todo.append(b)
    if dry_run:
        report.freed = {b: _state_bytes(run.layout.state(b)) for b in todo}
        return report
    with BlockLocks() as locks:
        taken = [b for b in todo if locks.acquire(run.layout.lock(b))]
        if len(taken) < len(todo):
            raise RunError(_busy_line(run, [b for b in todo if b not in taken]))
        for b in todo:
            if run.ledger.done(b):  # still done under the lock
                report.freed[b] = drop_state(run, b)
    return report


def _busy_line(run: Run, busy: list[int]) -> str:
    holder = lock_holder(run.layout.lock(busy[0])) or "another worker"
    shown = ", ".join(map(str, busy[:10])) + (", ..." if len(busy) > 10 else "")
    return (
        f"run {run.path}: block(s) {shown} are being trained (held by {holder}); prune when "
        "training ends, or name other blocks with --blocks"
    )
