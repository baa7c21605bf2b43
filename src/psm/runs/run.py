"""A run directory on disk: the resolved config, and per block its checkpoint, weights, status
and metrics.

::

    runs/ty-tpsm10/
      config.yaml                   resolved config + its hash
      data.json                     the data's shape and a content digest of each data file
      blocks/0003.safetensors       final weights (inference reads these)
      blocks/0003.state.safetensors resume point: weights + Adam moments + RNG state
      blocks/0003.json              status: state, step, last loss, wall time, checkpoint time
      blocks/0003.lock              held while a worker trains the block
      metrics/0003.jsonl            one line per logged step

Every file is written atomically (:mod:`psm.runs.atomic`); each block has its own files, so workers
on different machines never write the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write_json, atomic_write_text
from .config import (
    RunConfig,
    config_hash,
    hashed_differences,
    legacy_config_hash,
    validate_config,
)
from ..data import DataError, Dataset
from ..errors import RunError
from ..core.partition import Partition
from .run_parts import Parts
from ..core.process import Process

CONFIG_FILE = "config.yaml"
DATA_FILE = "data.json"


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
    path. Its parts (dataset, process, partition) are built once, on first use, and shared by
    everything that works on the run in this process.

    Attributes:
        hash: the config hash every block file carries.
        legacy_hash: True for a run made by psm 0.1, whose hash is
            :func:`~psm.runs.config.legacy_config_hash` (so its checkpoints stay valid).
    """

    def __init__(
        self, path: Path, config: RunConfig, hash_: str, *, legacy_hash: bool = False
    ) -> None:
        self.path = path
        self.config = config
        self.hash = hash_
        self.legacy_hash = legacy_hash
        self.parts = Parts(config, shape=self._recorded_shape())

    @property
    def partition(self) -> Partition:
        """The blocks and the time floor t0."""
        return self.parts.partition

    @property
    def process(self) -> Process:
        """The forward process."""
        return self.parts.process

    @property
    def dataset(self) -> Dataset:
        """The data (built on first use)."""
        return self.parts.dataset

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one data point (from ``data.json`` when recorded; no data loaded)."""
        return self.parts.shape

    def hash_of(self, config: RunConfig) -> str | None:
        """``config``'s hash under this run's hash scheme (None: not expressible in it)."""
        return legacy_config_hash(config) if self.legacy_hash else config_hash(config)

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls, config: RunConfig, path: str | Path | None = None, *, parts: Parts | None = None
    ) -> Run:
        """Start a run for ``config`` at ``path`` (default ``config.out_dir``), or reopen it.

        An existing run with the same problem (same :func:`~psm.runs.config.config_hash`) is reused;
        its step target, logging and executor settings are updated to ``config``'s, so a longer
        ``train.steps`` extends every block. A run with a different problem, or a non-empty
        folder that is not a run, is refused and left untouched. ``parts`` already built for
        ``config`` are reused (the data are not loaded twice).
        """
        path = Path(path) if path is not None else config.out_dir
        config = config.model_copy(update={"out": str(path)})
        if (path / CONFIG_FILE).exists():
            old = cls.open(path)
            if old.hash_of(config) != old.hash:
                diff = ", ".join(hashed_differences(old.config, config)) or "unknown fields"
                hint = ""
                if not old.trained_blocks():
                    hint = (
                        " (no block of it holds training: --reset-failed discards its failed "
                        "blocks and takes the new settings)"
                    )
                raise RunError(
                    f"run directory {path} holds a different config (differs in {diff}); "
                    f"use another --out or the same settings{hint}"
                )
            old.check_data()
            if old.config.model_dump() != config.model_dump():
                cls._write_config(path, config, old.hash, legacy=old.legacy_hash)
            return cls(path, config, old.hash, legacy_hash=old.legacy_hash)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunError(f"{path} exists and is not a psm run directory (no {CONFIG_FILE})")
        parts = parts if parts is not None else Parts(config)
        manifest = data_manifest(config, parts.dataset)  # a bad source fails before any write
        try:
            (path / "blocks").mkdir(parents=True, exist_ok=True)
            (path / "metrics").mkdir(exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {path}: {e.strerror}") from None
        h = config_hash(config)
        atomic_write_json(path / DATA_FILE, manifest)
        cls._write_config(path, config, h)
        run = cls(path, config, h)
        run.parts = parts  # built for the same problem (only ``out`` differs)
        return run

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
        scheme = raw.pop("hash_scheme", None)
        # psm 0.1 wrote t0 under process; such a run keeps its (legacy) hash
        legacy = scheme == "psm-0.1" or "t0" in (raw.get("process") or {})
        config = validate_config(raw, str(f))
        got = legacy_config_hash(config) if legacy else config_hash(config)
        if got != stored:
            raise RunError(f"{f} was edited by hand: its config_hash no longer matches")
        return cls(path, config, stored, legacy_hash=legacy)

    @staticmethod
    def _write_config(path: Path, config: RunConfig, h: str, *, legacy: bool = False) -> None:
        head = {"config_hash": h} | ({"hash_scheme": "psm-0.1"} if legacy else {})
        body = head | config.model_dump(mode="json")
        atomic_write_text(path / CONFIG_FILE, yaml.safe_dump(body, sort_keys=False))

    # ------------------------------------------------------------------ reset
    def trained_blocks(self) -> list[int]:
        """Blocks holding training worth keeping: any state but ``failed`` and ``pending``
        with a checkpoint or weights on disk."""
        out = []
        for b in range(self.num_blocks):
            state = (self.read_status(b) or {}).get("state", "pending")
            has_files = self.state_path(b).exists() or self.weights_path(b).exists()
            if state != "failed" and (state != "pending" or has_files):
                out.append(b)
        return out

    def failed_blocks(self) -> list[int]:
        """Blocks whose last training failed (e.g. a non-finite loss)."""
        return [
            b
            for b in range(self.num_blocks)
            if (self.read_status(b) or {}).get("state") == "failed"
        ]

    def reset_blocks(self, blocks: list[int]) -> None:
        """Discard blocks' checkpoints, weights, status and metrics (they start over)."""
        for b in blocks:
            for p in (self.state_path(b), self.weights_path(b), self.status_path(b),
                      self.metrics_path(b)):  # fmt: skip
                try:
                    p.unlink(missing_ok=True)
                except OSError as e:
                    raise RunError(f"cannot remove {p}: {e.strerror}") from None

    def replace_config(self, config: RunConfig) -> Run:
        """Give a run with no trained block a new problem (e.g. a lower learning rate after
        every block failed); returns the run reopened under it.

        Raises:
            RunError: some block holds training under the current config.
        """
        kept = self.trained_blocks()
        if kept:
            raise RunError(
                f"run {self.path}: block(s) {', '.join(map(str, kept[:10]))} hold training under "
                "its config; a different config needs another --out"
            )
        self.reset_blocks(list(range(self.num_blocks)))
        config = config.model_copy(update={"out": str(self.path)})
        parts = Parts(config)
        atomic_write_json(self.path / DATA_FILE, data_manifest(config, parts.dataset))
        h = config_hash(config)
        self._write_config(self.path, config, h)
        run = Run(self.path, config, h)
        run.parts = parts
        return run

    # ------------------------------------------------------------------ data guard
    def _recorded(self) -> dict[str, Any] | None:
        try:
            rec = json.loads((self.path / DATA_FILE).read_text())
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            return None
        return rec if isinstance(rec, dict) else None

    def _recorded_shape(self) -> tuple[int, ...] | None:
        rec = self._recorded()
        shape = rec.get("shape") if rec else None
        return tuple(int(s) for s in shape) if isinstance(shape, list) else None

    def check_data(self) -> None:
        """Refuse data files whose content changed since the run was created.

        Raises:
            DataError: one line naming the changed (or vanished) file.
        """
        rec = self._recorded()
        if rec is None:  # a run made by psm 0.1: nothing recorded to check against
            return
        for name, want in (rec.get("files") or {}).items():
            p = Path(name)
            if not p.is_file():
                raise DataError(
                    f"data file {p} of run {self.path} is gone; restore it to use this run"
                )
            if file_digest(p, want) != want.get("sha256"):
                raise DataError(
                    f"data file {p} changed since run {self.path} was created (its content "
                    "digest differs); restore the file, or train on it with a new --out"
                )

    # ------------------------------------------------------------------ block files
    @property
    def num_blocks(self) -> int:
        return self.partition.num_blocks

    @property
    def target_steps(self) -> int:
        """``train.steps``: the step target of every block unless ``train.block_steps`` gives
        each its own (:meth:`step_target`)."""
        return self.config.train.steps

    def step_target(self, block: int) -> int:
        """The step target of this invocation for one block (``train.block_steps[block]`` or
        ``train.steps``): a block trained now goes to it and records it in its status."""
        return self.config.step_target(block)

    @property
    def total_steps(self) -> int:
        """Block-steps of the whole run at this invocation's targets."""
        return sum(self.step_target(b) for b in range(self.num_blocks))

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

    def block_target(self, block: int) -> int:
        """The step target a block was last trained to (this invocation's if never trained)."""
        rec = self.read_status(block) or {}
        return int(rec.get("target", self.step_target(block)))

    def is_done(self, block: int, *, target: int | None = None) -> bool:
        """Whether a block reached its step target (or spent its time budget, if one is set)
        with its weights written.

        Args:
            block: the block id.
            target: the step target to check against; None uses the block's own recorded
                target (inference: blocks may be done at different step counts).
        """
        rec = self.read_status(block)
        if not rec or rec.get("state") != "done" or not self.weights_path(block).exists():
            return False
        if target is None:  # the block's own target, recorded when it was trained
            own = int(rec.get("target", self.step_target(block)))
            return rec.get("step", 0) >= own or bool(rec.get("budget_spent"))
        budget = self.config.train.max_seconds
        spent = budget is not None and float(rec.get("wall_time", 0.0)) >= budget
        return rec.get("step", 0) >= target or spent

    def block_status(self, block: int) -> BlockStatus:
        """The status of one block, with ``running`` checked against its lock."""
        from .lock import lock_holder_alive

        rec = self.read_status(block) or {}
        step = int(rec.get("step", 0))
        state = rec.get("state", "pending")
        if state == "done" and not self.is_done(block):
            state = "stopped"  # weights missing
        if state == "running" and not lock_holder_alive(self.lock_path(block)):
            state = "stopped"
        return BlockStatus(
            block=block,
            span=self.partition.describe(block),
            state=state,
            step=step,
            target=int(rec.get("target", self.step_target(block))),
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

    def unfinished(
        self, blocks: list[int] | None = None, *, target: int | None = None
    ) -> list[int]:
        """The blocks (of ``blocks``, default all) not yet done (at ``target``, see
        :meth:`is_done`)."""
        ids = range(self.num_blocks) if blocks is None else blocks
        return [b for b in ids if not self.is_done(b, target=target)]

    def todo(self, blocks: list[int] | None = None) -> list[int]:
        """The blocks (of ``blocks``, default all) not yet done at this invocation's targets
        (:meth:`step_target`): what a training call has left to do."""
        ids = range(self.num_blocks) if blocks is None else blocks
        return [b for b in ids if not self.is_done(b, target=self.step_target(b))]

    def check_block_ids(self, blocks: list[int]) -> None:
        """Refuse block ids outside ``0..K-1``."""
        bad = [b for b in blocks if not 0 <= b < self.num_blocks]
        if bad:
            raise RunError(
                f"block(s) {', '.join(map(str, bad))} out of range: this run has blocks "
                f"0-{self.num_blocks - 1}"
            )


def file_digest(path: Path, known: dict[str, Any] | None = None) -> str:
    """The sha256 of a file's content; reuses ``known["sha256"]`` when the file's size and
    modification time are those recorded beside it (large image arrays are hashed once)."""
    st = path.stat()
    if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        return str(known.get("sha256"))
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_manifest(config: RunConfig, dataset: Dataset) -> dict[str, Any]:
    """What ``data.json`` records: the shape of a point and each data file's size,
    modification time and sha256."""
    files = {}
    for p in config.data.files():
        st = p.stat()
        files[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_digest(p)}
    return {"dataset": dataset.name, "shape": list(dataset.shape), "files": files}


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
