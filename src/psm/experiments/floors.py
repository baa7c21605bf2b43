"""The floor of each table row: a likelihood that starts at the row's t0 scores the data under
``p_{t0}`` at best, so ``E[-log p_{t0}(x)]`` (exact, from the data's own marginal density:
:func:`psm.data.exact.nll_floor`) is what no model can beat. Cached per (data, process, t0,
samples) in one small JSON file each."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..data import make_dataset
from ..data.exact import nll_floor
from ..runs.atomic import atomic_write_json
from ..runs.config import ProcessConfig
from .catalogue import Method

FLOOR_SEED = 777
"""Seed of the data points the floor averages over."""


def floor_nll(data: str, method: Method, cache: Path, samples: int = 1_000_000) -> float:
    """``E[-log p_{t0}(x)]`` over the data set ``data`` under ``method``'s process and t0, exact
    density, Monte Carlo over ``samples`` points; cached in the folder ``cache``, one small file
    per (data, process, t0, samples)."""
    proc = json.dumps(method.process, sort_keys=True)
    t0 = method.partition["t0"]
    key = f"{data}:{proc}:t0={t0}:n={samples}"
    path = cache / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    if path.exists():
        return float(json.loads(path.read_text())["floor"])
    process = ProcessConfig(**method.process).build()
    alpha, sigma = process.schedule.alpha_sigma(torch.tensor(float(t0), dtype=torch.float64))
    floor = nll_floor(
        make_dataset(data), float(alpha), float(sigma), samples=samples, seed=FLOOR_SEED
    )
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": key, "floor": floor})
    return floor
