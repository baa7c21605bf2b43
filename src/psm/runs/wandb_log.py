"""Weights & Biases logging beside TensorBoard, when ``train.wandb`` asks for it
(``pip install 'psm[wandb]'``).

Each block of a run is its own W&B run (blocks train independently, on any machine, each from
its own step 0), grouped by the psm run (``<name>-<config hash>``)::

    train:
      wandb: {project: psm, entity: my-team}   # or: psm train CFG --set train.wandb=psm

The W&B run id of block b lives in the run directory, ``<run>/wandb/block_0003.json`` (with the
last step sent), so a resumed block — a later ``psm train``, another worker, another machine —
continues its own W&B run (``wandb.init(id=..., resume="allow")``) from its checkpoint's step:
steps the earlier attempt already sent (a worker killed after its last checkpoint) are not sent
again, and none are skipped. A block that starts over from step 0 (``--reset-failed``) gets a
new W&B run; the old id is kept in the record's ``replaced`` list. W&B's own files go to
``<run>/wandb/`` too.

wandb is never needed to read or score a run. With ``train.wandb`` set and wandb missing, ``psm
train`` stops with one line before anything is written (:func:`check_wandb`). Once a block's W&B
run has started, a failed upload only warns: W&B never stops training.
"""

from __future__ import annotations

import json
import secrets
import string
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from ..errors import PSMError
from ..spec import Section
from .atomic import atomic_write_json

if TYPE_CHECKING:
    from .run import Run

WANDB_DIR = "wandb"
INSTALL_HINT = "pip install 'psm[wandb]'"


class WandbConfig(Section):
    """``train.wandb``: where each block's W&B run goes. Not hashed (it changes no weight).

    Written as a mapping, or as the project name alone (``train.wandb: psm``).
    """

    project: str = Field(min_length=1)  # the W&B project
    entity: str | None = None  # user or team (default: W&B's default entity)
    group: str | None = None  # the runs' group (default: <run name>-<config hash>)
    tags: list[str] = Field(default_factory=list)
    mode: Literal["online", "offline"] | None = None  # default: W&B's (WANDB_MODE)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"project": v}
        return v


def wandb_module(setting: str = "train.wandb") -> Any:
    """The imported ``wandb`` package.

    Raises:
        PSMError: it is not installed (one line naming ``setting`` and the install command).
    """
    try:
        import wandb
    except ImportError:
        raise PSMError(
            f"{setting} is set but wandb is not installed: {INSTALL_HINT}, or drop {setting}"
        ) from None
    return wandb


def check_wandb(cfg: WandbConfig | None) -> None:
    """Fail early (one line) when ``train.wandb`` is set and wandb is missing."""
    if cfg is not None:
        wandb_module()


def record_path(run_path: str | Path, block: int) -> Path:
    """Block ``block``'s W&B record: ``<run>/wandb/block_NNNN.json``."""
    return Path(run_path) / WANDB_DIR / f"block_{block:04d}.json"


def read_record(run_path: str | Path, block: int) -> dict[str, Any] | None:
    """A block's W&B record (id, project, entity, last step sent), or None."""
    path = record_path(run_path, block)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("id"), str) else None


def new_run_id() -> str:
    """A fresh W&B run id: 8 lowercase letters and digits (W&B's own style)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


@dataclass
class _BlockRun:
    """One block's open W&B run, shared by the stacks of one process that train the block."""

    wb: Any
    path: Path
    record: dict[str, Any]
    sent_before: int  # the last step an earlier attempt sent (-1: none)
    refs: int = 1
    warned: bool = False

    def log(self, values: dict[str, float], step: int) -> None:
        """Send ``values`` at ``step`` unless an earlier attempt sent that step already; W&B
        needs steps that never go down, so a step below the last one sent is dropped too."""
        last = self.record.get("last_step")
        if step <= self.sent_before or (last is not None and step < last):
            return
        try:
            self.wb.log(dict(values), step=step)
        except Exception as e:  # W&B never stops a run
            self._warn(f"W&B logging failed ({e}); training goes on")
            return
        if last != step:
            self.record["last_step"] = step
            try:
                atomic_write_json(self.path, self.record, durable=False)
            except PSMError as e:
                self._warn(str(e))

    def _warn(self, text: str) -> None:
        if not self.warned:
            self.warned = True
            print(f"psm: warning: {text}", file=sys.stderr)


_OPEN: dict[tuple[str, int], _BlockRun] = {}
"""The W&B runs open in this process, by (run directory, block)."""


class WandbBlocks:
    """The W&B runs of a stack of blocks: open on creation, finished by :meth:`close`.

    A block whose W&B run is already open in this process (a stack split after a failure trains
    its healthy blocks in a new stack) shares it.

    Args:
        run: the psm run (``train.wandb`` set).
        blocks: the block ids trained together.
        resume_steps: each block's resume step (its checkpoint's; 0: a fresh start).

    Raises:
        PSMError: wandb is missing, or W&B refused to start a run.
    """

    def __init__(self, run: Run, blocks: Iterable[int], resume_steps: dict[int, int]) -> None:
        cfg = run.config.train.wandb
        if cfg is None:
            raise ValueError("train.wandb is not set")
        wandb = wandb_module()
        self.root = Path(run.path).resolve()
        self.blocks = list(blocks)
        self._held: list[int] = []
        try:
            for b in self.blocks:
                key = (str(self.root), b)
                if key in _OPEN:
                    _OPEN[key].refs += 1
                else:
                    _OPEN[key] = self._open(wandb, run, cfg, b, resume_steps.get(b, 0))
                self._held.append(b)
        except BaseException:
            self.close()
            raise

    def _open(self, wandb: Any, run: Run, cfg: WandbConfig, block: int, start: int) -> _BlockRun:
        path = record_path(self.root, block)
        rec = read_record(self.root, block)
        same_place = rec is not None and (rec.get("project"), rec.get("entity")) == (
            cfg.project,
            cfg.entity,
        )
        if rec is not None and same_place and start > 0:
            sent = rec.get("last_step")
            sent_before = int(sent) if isinstance(sent, int) else -1
        else:  # first time, another project, or the block starts over from step 0
            replaced = list(rec.get("replaced", [])) + [rec["id"]] if rec is not None else []
            rec = {"id": new_run_id(), "project": cfg.project, "entity": cfg.entity,
                   "block": block, "last_step": None, "replaced": replaced}  # fmt: skip
            sent_before = -1
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, rec)  # the id is on disk before the W&B run exists
        name = run.config.name
        try:
            wb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                id=rec["id"],
                resume="allow",
                name=f"{name} block {block}",
                group=cfg.group or f"{name}-{run.hash}",
                job_type="block",
                tags=list(cfg.tags),
                mode=cfg.mode,
                dir=str(self.root),
                reinit="create_new",
                config={
                    "block": block,
                    "span": run.partition.describe(block),
                    "config_hash": run.hash,
                    "psm": run.config.model_dump(mode="json"),
                },
            )
        except Exception as e:
            raise PSMError(f"train.wandb: W&B could not start block {block}'s run: {e}") from None
        return _BlockRun(wb, path, rec, sent_before)

    def log(self, block: int, values: dict[str, float], step: int) -> None:
        """Send one block's values at ``step`` (see :meth:`_BlockRun.log`)."""
        entry = _OPEN.get((str(self.root), block))
        if entry is not None and block in self._held:
            entry.log(values, step)

    def close(self) -> None:
        """Let go of the blocks' runs; a run no stack holds any more is finished."""
        held, self._held = self._held, []
        for b in held:
            key = (str(self.root), b)
            entry = _OPEN.get(key)
            if entry is None:
                continue
            entry.refs -= 1
            if entry.refs <= 0:
                del _OPEN[key]
                try:
                    entry.wb.finish()
                except Exception as e:
                    entry._warn(f"W&B could not finish block {b}'s run ({e})")
