"""Writing benchmark results: a JSON file and a markdown section of docs/benchmarks.md."""

from __future__ import annotations

import json
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import PSMError
from ..runs.atomic import atomic_write_text


def toy_run(root: Path, name: str, blocks: int, steps: int, batch: int, **train: Any):
    """A fresh TY run of ``blocks`` equal blocks under ``root`` for timing: status every 100
    steps, one checkpoint at the end; ``train`` sets further ``train.*`` fields."""
    from ..runs.config import validate_config
    from ..runs.run import Run

    settings = {"steps": steps, "batch_size": batch, "log_every": 100, "checkpoint_every": steps}
    raw = {
        "name": name,
        "data": {"name": "ty"},
        "partition": {"kind": "equal", "blocks": blocks},
        "train": settings | train,
    }
    path = root / name
    n = 0
    while path.exists():
        n += 1
        path = root / f"{name}-{n}"
    return Run.create(validate_config(raw), path)


def positive_ints(text: str, flag: str) -> tuple[int, ...]:
    """``"1,10,200"`` -> ``(1, 10, 200)``; a one-line error naming ``flag`` for anything else
    (a non-integer, a value below 1, an empty list)."""
    try:
        values = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise PSMError(f"{flag}: expected positive integers separated by commas, got {text!r}")
    return values


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: CPU, threads, torch version, GPU name if any."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_section(doc: str | Path, name: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- bench:name -->`` markers of ``doc``."""
    doc = Path(doc)
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nWritten by `psm bench`.\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(doc, text)


def write_results(
    result: dict[str, Any], json_path: str | Path, doc: str | Path | None, name: str, markdown: str
) -> None:
    """Write ``result`` as JSON and ``markdown`` as the ``name`` section of ``doc``."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(result, indent=1) + "\n")
    if doc is not None:
        write_section(doc, name, markdown)
