"""Where a run's files are: one path builder per file kind, nothing read or written.

::

    <run>/config.yaml                     resolved config + its hash
    <run>/data.json                       the data's shape and a content digest of each file
    <run>/blocks/0003.safetensors         final weights (inference reads these)
    <run>/blocks/0003.state.safetensors   resume point: weights + Adam moments + RNG state
    <run>/blocks/0003.json                status: state, step, target, last loss, wall time
    <run>/blocks/0003.lock                held while a worker trains the block
    <run>/metrics/0003.jsonl              one line per logged step
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = "config.yaml"
DATA_FILE = "data.json"


@dataclass(frozen=True)
class RunLayout:
    """The file layout of the run directory ``root``."""

    root: Path

    @property
    def config(self) -> Path:
        """The resolved config and its hash."""
        return self.root / CONFIG_FILE

    @property
    def data(self) -> Path:
        """The data manifest (shape, digests of data files)."""
        return self.root / DATA_FILE

    @property
    def blocks_dir(self) -> Path:
        return self.root / "blocks"

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def _block_file(self, folder: Path, block: int, suffix: str) -> Path:
        return folder / f"{block:04d}{suffix}"

    def weights(self, block: int) -> Path:
        """A block's final weights (what inference loads)."""
        return self._block_file(self.blocks_dir, block, ".safetensors")

    def state(self, block: int) -> Path:
        """A block's resume point (weights, Adam moments, RNG states)."""
        return self._block_file(self.blocks_dir, block, ".state.safetensors")

    def status(self, block: int) -> Path:
        """A block's status record (JSON)."""
        return self._block_file(self.blocks_dir, block, ".json")

    def lock(self, block: int) -> Path:
        """A block's lock file, present while a worker trains it."""
        return self._block_file(self.blocks_dir, block, ".lock")

    def metrics(self, block: int) -> Path:
        """A block's metric lines (JSONL)."""
        return self._block_file(self.metrics_dir, block, ".jsonl")

    def block_files(self, block: int) -> tuple[Path, ...]:
        """Every file a block's training leaves (the lock aside)."""
        return (self.state(block), self.weights(block), self.status(block), self.metrics(block))
