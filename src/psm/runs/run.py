"""A run directory: the handle that opens or creates it under a validated config.

A :class:`Run` holds the config and its hash, the run's parts (dataset, process, partition,
built once on first use), its file layout (:class:`~psm.runs.layout.RunLayout`: where each
file is) and its block ledger (:class:`~psm.runs.ledger.BlockLedger`: each block's status,
target and whether it is done). Every file is written atomically (:mod:`psm.runs.atomic`);
each block has its own files, so workers on different machines never write the same file.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..core.partition import Partition
from ..core.process import Process
from ..data import Dataset
from ..errors import RunError
from .atomic import atomic_write_json, atomic_write_text
from .config import (
    RunConfig,
    config_hash,
    hashed_differences,
    legacy_config_hash,
    validate_config,
)
from .data_guard import check_data, data_manifest, read_manifest, recorded_shape
from .layout import CONFIG_FILE, DATA_FILE, RunLayout
from .ledger import BlockLedger
from .run_parts import Parts
from .warm_start import check_reopened, resolve, source_record, write_record

__all__ = ["CONFIG_FILE", "DATA_FILE", "Run", "parse_blocks"]


class Run:
    """A run directory with a validated config.

    Use :meth:`create` to start or reopen a run from a config, :meth:`open` to reopen one by
    path.

    Attributes:
        path: the run directory.
        config: its config.
        hash: the config hash every block file carries.
        legacy_hash: True for a run made by psm 0.1, whose hash is
            :func:`~psm.runs.config.legacy_config_hash` (so its checkpoints stay valid).
        parts: dataset, process and partition, built once and shared by everything that works
            on the run in this process.
        layout: where the run's files are.
        ledger: the blocks' status records, targets and done-ness.
    """

    def __init__(
        self,
        path: Path,
        config: RunConfig,
        hash_: str,
        *,
        legacy_hash: bool = False,
        parts: Parts | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.hash = hash_
        self.legacy_hash = legacy_hash
        self.layout = RunLayout(path)
        self.parts = parts or Parts(config, shape=recorded_shape(read_manifest(self.layout.data)))
        self.ledger = BlockLedger(self.layout, self.parts.partition, config)

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

    @property
    def num_blocks(self) -> int:
        return self.partition.num_blocks

    def hash_of(self, config: RunConfig) -> str | None:
        """``config``'s hash under this run's hash scheme (None: not expressible in it).

        A warm start (``train.init_from``) naming this run's source path and block takes its
        recorded source hash (:func:`~psm.runs.warm_start.resolve`)."""
        config = resolve(config, self.config, target=self.path)
        return legacy_config_hash(config) if self.legacy_hash else config_hash(config)

    def check_data(self) -> None:
        """Refuse data files whose content changed since the run was created
        (:func:`~psm.runs.data_guard.check_data`)."""
        check_data(read_manifest(self.layout.data), self.path)

    def check_block_ids(self, blocks: list[int]) -> None:
        """Refuse block ids outside ``0..K-1``."""
        bad = [b for b in blocks if not 0 <= b < self.num_blocks]
        if bad:
            raise RunError(
                f"block(s) {', '.join(map(str, bad))} out of range: this run has blocks "
                f"0-{self.num_blocks - 1}"
            )

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls, config: RunConfig, path: str | Path | None = None, *, parts: Parts | None = None
    ) -> Run:
        """Start a run for ``config`` at ``path`` (default ``config.out_dir``), or reopen it.

        An existing run with the same problem (same :func:`~psm.runs.config.config_hash`) is
        reused; its step target, logging and executor settings are updated to ``config``'s, so
        a longer ``train.steps`` extends every block. A run with a different problem, or a
        non-empty folder that is not a run, is refused and left untouched. ``parts`` already
        built for ``config`` are reused (the data are not loaded twice).
        """
        path = Path(path) if path is not None else config.out_dir
        if config.partition.kind == "auto":
            raise RunError(
                "partition.kind auto is resolved by psm train (a pilot chooses the splits) "
                "before a run is made"
            )
        config = config.model_copy(update={"out": str(path)})
        layout = RunLayout(path)
        if layout.config.exists():
            old = cls.open(path)
            config = resolve(config, old.config, target=path)  # warm start: the source's hash
            if old.hash_of(config) != old.hash:
                _refuse_changed_source(path, old.config, config)
                diff = ", ".join(hashed_differences(old.config, config)) or "unknown fields"
                hint = ""
                if not old.ledger.trained():
                    hint = (
                        " (no block of it holds training: --reset-failed discards its failed "
                        "blocks and takes the new settings)"
                    )
                raise RunError(
                    f"run directory {path} holds a different config (differs in {diff}); "
                    f"use another --out or the same settings{hint}"
                )
            old.check_data()
            moved = check_reopened(old, config)  # a block still to start: the source unchanged
            if moved is not None:
                write_record(path, moved)
            if old.config.model_dump() != config.model_dump():
                _write_config(layout, config, old.hash, legacy=old.legacy_hash)
            return cls(path, config, old.hash, legacy_hash=old.legacy_hash)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise RunError(f"{path} exists and is not a psm run directory (no {CONFIG_FILE})")
        config = resolve(config, target=path)
        parts = parts if parts is not None else Parts(config)
        manifest = data_manifest(config, parts.dataset)  # a bad source fails before any write
        warm = source_record(config, parts, path)  # so does a warm start that cannot be used
        try:
            layout.blocks_dir.mkdir(parents=True, exist_ok=True)
            layout.metrics_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {path}: {e.strerror}") from None
        h = config_hash(config)
        atomic_write_json(layout.data, manifest)
        if warm is not None:
            write_record(path, warm)
        _write_config(layout, config, h)
        # the parts were built for the same problem (only ``out`` differs)
        return cls(path, config, h, parts=parts)

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """Reopen an existing run; a missing folder or config is a :class:`RunError`."""
        path = Path(path)
        if not path.is_dir():
            raise RunError(f"run directory {path} does not exist")
        f = RunLayout(path).config
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
        config = validate_config(_known_executor(raw), str(f))
        got = legacy_config_hash(config) if legacy else config_hash(config)
        if got != stored:
            raise RunError(f"{f} was edited by hand: its config_hash no longer matches")
        return cls(path, config, stored, legacy_hash=legacy)

    def replace_config(self, config: RunConfig) -> Run:
        """Give a run with no trained block a new problem (e.g. a lower learning rate after
        every block failed); returns the run reopened under it.

        Raises:
            RunError: some block holds training under the current config.
        """
        kept = self.ledger.trained()
        if kept:
            raise RunError(
                f"run {self.path}: block(s) {', '.join(map(str, kept[:10]))} hold training under "
                "its config; a different config needs another --out"
            )
        config = resolve(config.model_copy(update={"out": str(self.path)}), target=self.path)
        parts = Parts(config)
        warm = source_record(config, parts, self.path)
        self.ledger.reset(list(range(self.num_blocks)))
        atomic_write_json(self.layout.data, data_manifest(config, parts.dataset))
        write_record(self.path, warm)
        h = config_hash(config)
        _write_config(self.layout, config, h)
        return Run(self.path, config, h, parts=parts)


def _refuse_changed_source(path: Path, old: RunConfig, new: RunConfig) -> None:
    """One line when the only change is the warm-start source's config hash (same path and
    block): the source was retrained under another config since the run was made."""
    a, b = old.train.init_from, new.train.init_from
    if a is None or b is None or (a.run, a.block) != (b.run, b.block):
        return
    if hashed_differences(old, new) == ["train.init_from"]:
        from .warm_start import InitFromError

        raise InitFromError(
            f"warm-start source {b.run} of run {path} changed: its config hash is {b.hash}, the "
            f"run was made from {a.hash}; restore it, or start a new run (another --out)"
        )


def _known_executor(raw: dict) -> dict:
    """``raw`` with an executor section this process does not know (a plugin registered only
    where the run was trained) replaced by the default: the section is not hashed, and reading
    or scoring a run must not need the executor that trained it."""
    from ..executors import EXECUTORS

    section = raw.get("executor")
    name = section.get("name") if isinstance(section, dict) else None
    if isinstance(name, str) and name not in EXECUTORS:
        return {**raw, "executor": {}}
    return raw


def _write_config(layout: RunLayout, config: RunConfig, h: str, *, legacy: bool = False) -> None:
    head = {"config_hash": h} | ({"hash_scheme": "psm-0.1"} if legacy else {})
    body = head | config.model_dump(mode="json")
    atomic_write_text(layout.config, yaml.safe_dump(body, sort_keys=False))


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
