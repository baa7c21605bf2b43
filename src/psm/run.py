"""A run directory on disk: the resolved config, and per block its checkpoint, weights, status
and metrics.

::

    runs/ty-tpsm10/
      config.yaml                   resolved config + its hash
      blocks/0003.safetensors       final weights (inference reads these)
      blocks/0003.state.safetensors resume point: weights + Adam moments + RNG state
      blocks/0003.json              status: state, step, last loss, wall time, checkpoint time
      blocks/0003.lock              held while a worker trains the block
      metrics/0003.jsonl            one line per logged step

Every file is written atomically (:mod:`psm.atomic`); each block has its own files, so workers
on different machines never write the same file.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write_json, atomic_write_text
from .config import RunConfig, config_hash, hashed_differences, validate_config
from .errors import RunError
from .partition import Partition

CONFIG_FILE = "config.yaml"
BLOCK_STATES = ("pending", "running", "stopped", "done", "failed")


@dataclass
class BlockStatus:
    """What ``psm status`` shows for one block."""

    block: int
    span: str
    state: str  # pending | running | stopped | done | failed
    step: int
    target: int
    last_loss: float | None
    wall_time: float
    checkpoint_step: int | None
    checkpoint_time: float | None
    error: str | None
    updated: float | None
    host: str | None = None
    job: str | None = None


class Run:
    """A run directory with a validated config.

    Use :meth:`create` to start or reopen a run from a config, :meth:`open` to reopen one by
    path.
    """

    def __init__(self, path: Path, config: RunConfig, hash_: str) -> None:
        self.path = path
        self.config = config
        self.hash = hash_
        self.partition: Partition = config.build_partition()

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, config: RunConfig, path: str | Path | None = None) -> Run:
        """Start a run for ``config`` at ``path`` (default ``config.out_dir``), or reopen it.

        An existing run with the same problem (same :func:`~psm.config.config_hash`) is reused;
        its step target, logging and executor settings are updated to ``config``'s, so a longer
        ``train.steps`` extends every block. A run with a different problem, or a non-empty
        folder that is not a run, is refused and left untouched.
        """
        path = Path(path) if path is not None else config.out_dir
        config = config.model_copy(update={"out": str(path)})
        h = config_hash(config)
        if (path / CONFIG_FILE).exists():
            old = cls.open(path)
            if old.hash != h:
                diff = ", ".join(hashed_differences(old.config, config)) or "unknown fields"
                raise RunError(
                    f"run directory {path} holds a different config (differs in {diff}); "
                    "use another --out or the same settings"
                )
            if old.config.model_dump() != config.model_dump():
                cls._write_config(path, config, h)
            return cls(path, config, h)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunError(f"{path} exists and is not a psm run directory (no {CONFIG_FILE})")
        try:
            (path / "blocks").mkdir(parents=True, exist_ok=True)
            (path / "metrics").mkdir(exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {path}: {e.strerror}") from None
        cls._write_config(path, config, h)
        return cls(path, config, h)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """Reopen an existing run; a missing folder or config is a :class:`RunError`."""
        path = Path(path)
        if not path.is_dir():
            raise RunError(f"run directory {path} does not exist")
        f = path / CONFIG_FILE
        if not f.is_file():
            raise RunError(f"{path} is not a psm run directory (no {CONFIG_FILE})")
        try:
            raw = yaml.safe_load(f.read_text())
        except yaml.YAMLError:
            raise RunError(f"{f} is not valid YAML") from None
        if not isinstance(raw, dict) or "config_hash" not in raw:
            raise RunError(f"{f} is not a psm run config (no config_hash)")
        stored = raw.pop("config_hash")
        config = validate_config(raw, str(f))
        if config_hash(config) != stored:
            raise RunError(f"{f} was edited by hand: its config_hash no longer matches")
        return cls(path, config, stored)

    @staticmethod
    def _write_config(path: Path, config: RunConfig, h: str) -> None:
        body = {"config_hash": h, **config.model_dump(mode="json")}
        atomic_write_text(path / CONFIG_FILE, yaml.safe_dump(body, sort_keys=False))

    # ------------------------------------------------------------------ block files
    @property
    def num_blocks(self) -> int:
        return self.partition.num_blocks

    @property
    def target_steps(self) -> int:
        return self.config.train.steps

    def _block_file(self, sub: str, block: int, suffix: str) -> Path:
        return self.path / sub / f"{block:04d}{suffix}"

    def weights_path(self, block: int) -> Path:
        return self._block_file("blocks", block, ".safetensors")

    def state_path(self, block: int) -> Path:
        return self._block_file("blocks", block, ".state.safetensors")

    def status_path(self, block: int) -> Path:
        return self._block_file("blocks", block, ".json")

    def lock_path(self, block: int) -> Path:
        return self._block_file("blocks", block, ".lock")

    def metrics_path(self, block: int) -> Path:
        return self._block_file("metrics", block, ".jsonl")

    # ------------------------------------------------------------------ status
    def read_status(self, block: int) -> dict[str, Any] | None:
        """The raw status record of a block, or None before it first started."""
        p = self.status_path(block)
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None

    def write_status(self, block: int, **fields: Any) -> None:
        """Merge ``fields`` into a block's status record (atomic)."""
        rec = self.read_status(block) or {}
        rec.update(fields)
        rec.update(block=block, updated=time.time(), host=socket.gethostname(), pid=os.getpid())
        # a progress record: atomic, not fsynced (the checkpoint is the durable truth)
        atomic_write_json(self.status_path(block), rec, durable=False)

    def is_done(self, block: int) -> bool:
        """Whether a block reached its step target (or spent its time budget, if one is set)
        with its weights written."""
        rec = self.read_status(block)
        if not rec or rec.get("state") != "done" or not self.weights_path(block).exists():
            return False
        budget = self.config.train.max_seconds
        spent = budget is not None and float(rec.get("wall_time", 0.0)) >= budget
        return rec.get("step", 0) >= self.target_steps or spent

    def block_status(self, block: int) -> BlockStatus:
        """The status of one block, with ``running`` checked against its lock."""
        from .lock import lock_holder_alive

        rec = self.read_status(block) or {}
        step = int(rec.get("step", 0))
        state = rec.get("state", "pending")
        if state == "done" and not self.is_done(block):
            state = "stopped"  # extended to more steps
        if state == "running" and not lock_holder_alive(self.lock_path(block)):
            state = "stopped"
        return BlockStatus(
            block=block,
            span=self.partition.describe(block),
            state=state,
            step=step,
            target=self.target_steps,
            last_loss=rec.get("last_loss"),
            wall_time=float(rec.get("wall_time", 0.0)),
            checkpoint_step=rec.get("checkpoint_step"),
            checkpoint_time=rec.get("checkpoint_time"),
            error=rec.get("error"),
            updated=rec.get("updated"),
            host=rec.get("host"),
            job=rec.get("job"),
        )

    def statuses(self, blocks: list[int] | None = None) -> list[BlockStatus]:
        """Status of the given blocks (default: all)."""
        ids = range(self.num_blocks) if blocks is None else blocks
        return [self.block_status(b) for b in ids]

    def unfinished(self, blocks: list[int] | None = None) -> list[int]:
        """The blocks (of ``blocks``, default all) not yet done."""
        ids = range(self.num_blocks) if blocks is None else blocks
        return [b for b in ids if not self.is_done(b)]

    def check_block_ids(self, blocks: list[int]) -> None:
        """Refuse block ids outside ``0..K-1``."""
        bad = [b for b in blocks if not 0 <= b < self.num_blocks]
        if bad:
            raise RunError(
                f"block(s) {', '.join(map(str, bad))} out of range: this run has blocks "
                f"0-{self.num_blocks - 1}"
            )


def parse_blocks(spec: str) -> list[int]:
    """Parse ``"3,5-9"`` into ``[3, 5, 6, 7, 8, 9]``."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise RunError(f"--blocks {spec!r}: expected ids and ranges like 3,5-9") from None
    if not out:
        raise RunError(f"--blocks {spec!r}: no block ids")
    return sorted(set(out))
