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


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run ``psm argv...`` in this process: ``(exit code, stdout, stderr)``."""
    from psm.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv, match: str) -> str:
    """Run a command that must fail with exit 2 and exactly one line ``psm: error: ...``
    containing ``match``; return that line."""
    code, _, err = run_cli(capsys, *argv)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("psm: error: ") and match in lines[0], lines[0]
    return lines[0]
