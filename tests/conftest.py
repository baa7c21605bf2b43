"""Shared fixtures: tiny runs that train in well under a second per block."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import tiny_config
from psm.runs.config import validate_config
from psm.runs.run import Run

torch.set_num_threads(1)


@pytest.fixture
def make_run(tmp_path: Path):
    """Create a run from :func:`tiny_config` overrides in a fresh folder."""
    counter = iter(range(1000))

    def make(path: Path | None = None, **sections: Any) -> Run:
        where = path or tmp_path / f"run{next(counter)}"
        return Run.create(validate_config(tiny_config(**sections)), where)

    return make
