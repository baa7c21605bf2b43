"""Warm starts (``train.init_from``): every block of a new run starts from a trained run's
final weights instead of its random init.

* **Which source block.** A source with one block (an SA-DPM run) gives every block its net
  (eDiff-I builds its experts from one shared model); a source with as many blocks as the run
  gives block b its block b; ``RUN:BLOCK`` gives every block that source block; ``RUN:time``
  gives each block its neighbour in time, the source block owning the middle of its range
  (refining a run into more or other blocks). Anything else (another number of blocks
  without ``:BLOCK`` or ``:time``, nets whose parameter names or shapes differ —
  a time-free DPSM net and a time-conditioned one —, a source block not done) is refused in one
  line (:class:`InitFromError`) before anything is written; a block never silently starts
  from a random net it was not meant to.
* **The hash.** The config holds the source's config hash (``InitFrom.hash``, filled in by
  :func:`resolve` when the run is created), and the config hash covers it and ``block``, not
  the path: moving the source is fine, and :func:`~psm.runs.config.config_hash` stays a pure
  function of the stored config.
* **The record.** ``init_from.json`` (beside ``data.json``) says where the source is, its hash,
  which source block each block starts from, and the size, modification time and sha256 of each
  source weights file used. While some block is still to start from the source (it has no
  resume point), reopening the run checks the source against it like the data guard checks
  the data (:func:`check_reopened`: a changed config hash or weights digest is refused in one
  line, nothing touched), and a worker loads the weights only if their digest is the recorded
  one (:func:`start_block`). Once every block holds a checkpoint the source is not read again.
* **The weights.** Read with safetensors (never unpickled): the source block's final weights
  file, which holds its EMA weights when it trained with ``train.ema`` — what its inference
  loads. Adam starts fresh. Each block's status records ``init_from`` (source, hash, block),
  which ``psm status`` shows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from torch import nn

from ..errors import RunError
from .atomic import atomic_write_json
from .checkpoint import FORMAT
from .config import InitFrom, RunConfig
from .data_guard import file_digest
from .layout import CONFIG_FILE, RunLayout

if TYPE_CHECKING:
    from ..core.partition import Partition
    from .run import Run
    from .run_parts import Parts

INIT_FILE = "init_from.json"
"""The warm-start record, beside ``data.json``."""

__all__ = [
    "INIT_FILE",
    "InitFromError",
    "block_map",
    "check_config",
    "check_reopened",
    "init_file",
    "read_record",
    "resolve",
    "source_record",
    "start_block",
    "write_record",
]


class InitFromError(RunError):
    """A warm-start source that cannot be used: missing, unfinished, another number of blocks,
    another net, or changed since the run was created."""


def init_file(run_path: str | Path) -> Path:
    """Where a run keeps its warm-start record."""
    return Path(run_path) / INIT_FILE


def read_record(run_path: str | Path) -> dict[str, Any] | None:
    """A run's warm-start record (None: absent or unreadable)."""
    try:
        rec = json.loads(init_file(run_path).read_text())
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def write_record(run_path: str | Path, record: dict[str, Any] | None) -> None:
    """Write (or, for None, remove) a run's warm-start record."""
    if record is None:
        init_file(run_path).unlink(missing_ok=True)
    else:
        atomic_write_json(init_file(run_path), record)


def _with_spec(config: RunConfig, spec: InitFrom) -> RunConfig:
    train = config.train.model_copy(update={"init_from": spec})
    return config.model_copy(update={"train": train})


def open_source(spec: InitFrom, target: str | Path | None = None) -> Run:
    """The source run of ``spec`` (read only), or a one-line :class:`InitFromError`."""
    from .run import Run

    src = Path(spec.run)
    if target is not None and src.resolve() == Path(target).resolve():
        raise InitFromError(f"train.init_from: {spec.run} is this run itself")
    try:
        return Run.open(src)
    except RunError as e:
        raise InitFromError(f"train.init_from: {e}") from None


def resolve(
    config: RunConfig, recorded: RunConfig | None = None, *, target: str | Path | None = None
) -> RunConfig:
    """``config`` with ``train.init_from.hash`` filled in: the source's config hash.

    A config without ``init_from``, or whose ``init_from`` already names a hash (a run's stored
    config), is returned as is. ``recorded`` is the config of the run being reopened: when it
    names the same source path and block, its hash is taken without reading the source (which
    :func:`check_reopened` then checks if some block still needs it); otherwise the source is
    opened.
    """
    spec = config.train.init_from
    if spec is None or spec.hash is not None:
        return config
    old = recorded.train.init_from if recorded is not None else None
    if (
        old is not None
        and old.hash
        and old.model_dump(exclude={"hash"}) == spec.model_dump(exclude={"hash"})
    ):  # the same source, block and match: its hash is known
        h = old.hash
    else:
        h = open_source(spec, target).hash
    return _with_spec(config, spec.model_copy(update={"hash": h}))


def block_map(spec: InitFrom, source: Partition, target: Partition) -> list[int]:
    """The source block each block of ``target`` starts from, or a one-line error.

    ``match: time`` (``RUN:time``): block b takes the source block that owns the middle of b's
    training range (:meth:`~psm.core.partition.Partition.train_range`; a DPSM block's time
    point), on the source's own partition — for any two partitions of [0, 1].
    """
    source_blocks, blocks = source.num_blocks, target.num_blocks
    if spec.match == "time":
        mids = [sum(target.train_range(b)) / 2 for b in range(blocks)]
        return [int(s) for s in source.block_of(torch.tensor(mids, dtype=torch.float64))]
    if spec.block is not None:
        if spec.block >= source_blocks:
            raise InitFromError(
                f"train.init_from: {spec.run} has blocks 0-{source_blocks - 1}, no block "
                f"{spec.block}"
            )
        return [spec.block] * blocks
    if source_blocks == 1:
        return [0] * blocks
    if source_blocks == blocks:
        return list(range(blocks))
    raise InitFromError(
        f"train.init_from: {spec.run} has {source_blocks} blocks and this run {blocks}; start "
        f"from a one-block run, one with {blocks} blocks, name a block ({spec.run}:BLOCK), or "
        f"map blocks by time ({spec.run}:time)"
    )


def _header(path: Path, where: str, sb: int) -> tuple[dict[str, str], dict[str, tuple]]:
    """A source weights file's metadata and tensor shapes (no tensor is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise InitFromError(f"train.init_from: {path} (block {sb} of {where}) is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InitFromError(
            f"train.init_from: {path} (block {sb} of {where}) is unreadable: "
            f"{str(e).splitlines()[0]}"
        ) from None
    return meta, shapes


def _shape_mismatch(got: dict[str, tuple], want: dict[str, tuple]) -> str | None:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = [k for k in want if k in got and got[k] != want[k]]
    parts = []
    if missing:
        parts.append(f"this run's net has {', '.join(missing[:3])}, the source's not")
    if extra:
        parts.append(f"the source's net has {', '.join(extra[:3])}, this run's not")
    if shapes:
        k = shapes[0]
        parts.append(f"{k} is {list(got[k])} there, {list(want[k])} here")
    return "; ".join(parts) or None


def source_record(
    config: RunConfig,
    parts: Parts,
    target: str | Path,
    blocks: list[int] | None = None,
    *,
    known: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Check a warm-start source for the run at ``target`` and say what ``init_from.json``
    records: the source's path and hash, the block map, and each used weights file's size,
    modification time, step and sha256. Reads the source, writes nothing.

    Args:
        config: the run's config, resolved (:func:`resolve`).
        parts: the run's parts (its partition and net).
        target: the run directory.
        blocks: the blocks still to start from the source (default: all).
        known: the ``files`` of a previous record, whose digests are reused for files of the
            same size and modification time.

    Raises:
        InitFromError: the source is missing, has another config hash than ``config`` names,
            does not map onto this run's blocks, has a used block not done, or a net whose
            parameter names or shapes differ from this run's.
    """
    spec = config.train.init_from
    if spec is None:
        return None
    src = open_source(spec, target)
    where = spec.run
    if spec.hash is not None and src.hash != spec.hash:
        raise InitFromError(
            f"warm-start source {where} changed: its config hash is {src.hash}, the run was "
            f"made from {spec.hash}; restore it, or start a new run (another --out)"
        )
    k = parts.partition.num_blocks
    mapping = block_map(spec, src.parts.partition, parts.partition)
    used = sorted({mapping[b] for b in (range(k) if blocks is None else blocks)})
    not_done = [sb for sb in used if not src.ledger.done(sb)]
    if not_done:
        states = ", ".join(f"{sb} ({src.ledger.status(sb).state})" for sb in not_done[:5])
        raise InitFromError(
            f"train.init_from: block(s) {states} of {where} not done; finish training the "
            "source first"
        )
    targets = list(range(k) if blocks is None else blocks)
    wants: dict[str, dict[str, tuple]] = {}  # the target nets' shapes, by net spec
    for b in targets:
        key = config.net_key(b)
        if key not in wants:
            wants[key] = {n: tuple(t.shape) for n, t in parts.new_net(b).state_dict().items()}
        mine, theirs = parts.prediction(b), src.parts.prediction(mapping[b])
        if mine != theirs:
            raise InitFromError(
                f"train.init_from: block {b} predicts {mine}, block {mapping[b]} of {where} "
                f"predicts {theirs}; a warm start needs the same prediction"
            )
    files: dict[str, Any] = {}
    for sb in used:
        want_keys = {config.net_key(b) for b in targets if mapping[b] == sb}
        path = src.layout.weights(sb)
        meta, shapes = _header(path, where, sb)
        if meta.get("format") != FORMAT or meta.get("config_hash") != src.hash:
            raise InitFromError(
                f"train.init_from: {path} is not a weights file of {where} (config hash "
                f"{meta.get('config_hash')}, the run's is {src.hash})"
            )
        if meta.get("block") != str(sb):
            raise InitFromError(f"train.init_from: {path} holds block {meta.get('block')}")
        bad = next(filter(None, (_shape_mismatch(shapes, wants[w]) for w in sorted(want_keys))),
                   None)  # fmt: skip
        if bad:
            raise InitFromError(
                f"train.init_from: the net of {where} does not fit this run's ({bad})"
            )
        st = path.stat()
        files[str(sb)] = {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": file_digest(path, (known or {}).get(str(sb))),
            "step": int(meta.get("step", 0)),
        }
    return {
        "run": str(src.path.resolve()),
        "config_hash": src.hash,
        "block": spec.block,
        "map": mapping,
        "files": files,
    }


def waiting_blocks(run: Run) -> list[int]:
    """The blocks that would start from the source now: those without a resume point (or
    final weights: a pruned block restarts from its own)."""
    lay = run.layout
    return [b for b in range(run.num_blocks)
            if not lay.state(b).exists() and not lay.weights(b).exists()]  # fmt: skip


def check_reopened(run: Run, config: RunConfig) -> dict[str, Any] | None:
    """Check a reopened run's source while some block still starts from it.

    ``config`` is the (resolved) config the run is reopened with, hashing like the run's. The
    source at ``config``'s path must still have the recorded config hash and, for every source
    block still to be used, the recorded weights digest.

    Returns:
        The record to write when the source was moved (same content, another path), else None.

    Raises:
        InitFromError: the source is gone, changed (retrained, another config), or the record
            is missing; nothing is written.
    """
    spec = config.train.init_from
    if spec is None:
        return None
    need = waiting_blocks(run)
    if not need:
        return None  # every block holds a checkpoint: the source is not read again
    old = read_record(run.path)
    if old is None:
        raise InitFromError(
            f"run {run.path} starts from {spec.run} but has no {INIT_FILE}; start a new run "
            "(another --out)"
        )
    new = source_record(config, run.parts, run.path, need, known=old.get("files"))
    assert new is not None
    recorded = old.get("files") or {}
    changed = [sb for sb, f in new["files"].items()
               if (recorded.get(sb) or {}).get("sha256") != f["sha256"]]  # fmt: skip
    if changed:
        raise InitFromError(
            f"warm-start source {spec.run} changed since run {run.path} was created (weights "
            f"of its block(s) {', '.join(changed[:5])} differ: retrained?); restore them, or "
            "start a new run (another --out)"
        )
    if new["run"] != old.get("run"):
        return old | {"run": new["run"]}  # the source moved: same content, new place
    return None


def check_config(config: RunConfig, parts: Parts) -> RunConfig:
    """``config`` resolved and its source checked, for a command about to create or reuse the
    run at ``config.out_dir`` (e.g. ``psm train --dry-run``); writes nothing."""
    if config.train.init_from is None:
        return config
    from .run import Run

    out = config.out_dir
    if (out / CONFIG_FILE).exists():
        return resolve(config, Run.open(out).config, target=out)
    config = resolve(config, target=out)
    source_record(config, parts, out)
    return config


_CACHE: dict[tuple[str, str], dict[str, Any]] = {}


def _source_tensors(path: Path, sha256: str, block: int, where: str) -> dict[str, Any]:
    """The tensors of a source weights file whose content digest is ``sha256`` (cached: a
    thousand grid blocks that all start from one SA-DPM net read it once)."""
    key = (str(path), sha256)
    if key not in _CACHE:
        try:
            data = path.read_bytes()
        except OSError:
            raise InitFromError(
                f"block {block}: warm-start source {path} is gone; restore it (or train this "
                "block's run anew with another --out)"
            ) from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise InitFromError(
                f"block {block}: warm-start source {path} ({where}) changed since the run was "
                "created (its weights digest differs: retrained?); restore it, or start a new "
                "run (another --out)"
            )
        _CACHE.clear()
        _CACHE[key] = st_load(data)
    return _CACHE[key]


def start_block(run: Run, block: int, net: nn.Module) -> dict[str, Any]:
    """Load block ``block``'s warm start into ``net`` (the source's final weights, checked
    against the recorded digest) and record where it started in the block's status.

    Returns:
        The status entry ``{"run", "hash", "block"}``.

    Raises:
        InitFromError: no record, the source gone or changed, or weights that do not fit.
    """
    spec = run.config.train.init_from
    rec = read_record(run.path)
    if spec is None or rec is None:
        raise InitFromError(f"run {run.path} has no {INIT_FILE}; start a new run (another --out)")
    try:
        sb = int(rec["map"][block])
        entry = rec["files"][str(sb)]
        source = Path(rec["run"])
    except (KeyError, IndexError, TypeError, ValueError):
        raise InitFromError(f"run {run.path}: {INIT_FILE} is malformed") from None
    path = RunLayout(source).weights(sb)
    tensors = _source_tensors(path, str(entry.get("sha256")), block, spec.run)
    ref = net.state_dict()
    bad = _shape_mismatch({k: tuple(v.shape) for k, v in tensors.items()},
                          {k: tuple(v.shape) for k, v in ref.items()})  # fmt: skip
    if bad:
        raise InitFromError(f"block {block}: the warm-start net does not fit ({bad})")
    net.load_state_dict({k: tensors[k].to(device=v.device, dtype=v.dtype) for k, v in ref.items()})
    origin = {"run": str(source), "hash": rec.get("config_hash"), "block": sb}
    run.ledger.write(block, init_from=origin)
    return origin
