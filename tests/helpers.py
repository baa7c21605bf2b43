"""Small builders shared by the tests."""

from __future__ import annotations

from typing import Any


def tiny_config(**sections: Any) -> dict[str, Any]:
    """A raw config dict for a small, fast run; ``sections`` update the defaults."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "data": {"name": "ty"},
        "partition": {"kind": "equal", "blocks": 3},
        "net": {"hidden": [16, 16]},
        "train": {"steps": 20, "batch_size": 64, "log_every": 5, "checkpoint_every": 10},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw
