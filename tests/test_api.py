"""The short Python API (psm.train, psm.load, psm.export, Model): the README's Python code runs
exactly as written, ``import psm`` stays cheap, and overrides follow ``psm train``'s."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import psm
from helpers import tiny_config
from psm.errors import ConfigError, PSMError
from psm.runs.run import Run

README = Path(__file__).parents[1] / "README.md"
CONFIG = Path(__file__).parents[1] / "configs" / "toy" / "ty_tpsm10.yaml"


def readme_python() -> str:
    """The Python code block of the README's "From Python" section."""
    text = README.read_text()
    section = text.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the From Python section has one Python code block"
    return blocks[0]


def test_the_readmes_python_runs_as_written(tmp_path, monkeypatch, capsys):
    code = readme_python()
    monkeypatch.chdir(tmp_path)  # its relative paths (runs/..., the export) land here
    # one torch thread, as the rest of the suite (the executor gives a run CPUs / workers)
    monkeypatch.setattr("psm.executors.local.cpu_count", lambda: 1)
    ns: dict = {}
    exec(compile(code, "README.md (From Python)", "exec"), ns)
    out = capsys.readouterr().out
    run, x, logp = ns["run"], ns["x"], ns["logp"]
    assert isinstance(run, Run) and run.ledger.not_done() == []
    assert run.path == Path("runs/ty-python") and (tmp_path / "runs/ty-python").is_dir()
    assert x.shape == (1000, 2) and torch.isfinite(x).all()
    assert logp.shape == (10,) and logp.dtype == torch.float64 and torch.isfinite(logp).all()
    m = re.search(r"NLL (\S+) ± (\S+) nats on 500 test points of ty \(true entropy", out)
    assert m and math_ok(float(m[1])) and 0 < float(m[2]) < 1, out
    # the exported file gives the same model
    exported = psm.load(tmp_path / "ty-python.safetensors")
    assert torch.equal(exported.log_prob(x[:10]), logp)


def math_ok(v: float) -> bool:
    return v == v and abs(v) < 100


def test_import_psm_loads_no_torch():
    script = (
        "import sys, psm\n"
        "assert 'torch' not in sys.modules, 'import psm loaded torch'\n"
        "assert {'train', 'load', 'export', 'Model'} <= set(dir(psm))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert psm.load is psm.api.load and psm.Model is psm.api.Model  # on first use
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = psm.nothing


def test_overrides_follow_psm_train():
    from psm.api import make_config

    cfg = make_config(
        CONFIG, "elsewhere", steps=30, seed=4, executor="ensemble",
        net={"hidden": [8, 8]}, **{"train.lr": 3e-4, "eval.steps": 12},
    )  # fmt: skip
    assert (cfg.name, cfg.out, cfg.train.steps, cfg.train.seed) == ("ty_tpsm10", "elsewhere", 30, 4)
    assert cfg.net.hidden == [8, 8] and cfg.net.activation == "elu"  # a section is merged
    assert cfg.train.lr == 3e-4 and cfg.eval.steps == 12 and cfg.executor.name == "ensemble"
    assert cfg.train.batch_size == 512  # the file's, untouched
    raw = tiny_config()
    assert make_config(raw).model_dump() == make_config(make_config(raw)).model_dump()
    assert make_config(raw, budget="1h").train.budget.total == "1h"
    with pytest.raises(ConfigError, match="lr is not a section"):
        make_config(raw, **{"train.lr": 1e-3, "train.lr.x": 1})
    with pytest.raises(ConfigError, match=r"train\.steps"):
        make_config(raw, steps=0)
    with pytest.raises(ConfigError, match="block_steps"):
        make_config(raw, steps=5, **{"train.block_steps": [1, 2, 3]})


def test_model_refuses_bad_inputs_in_one_line(tmp_path):
    cfg = tiny_config(partition={"kind": "equal", "blocks": 1}, train={"steps": 5})
    run = psm.train(cfg, tmp_path / "r", progress=False)
    assert psm.train(cfg, tmp_path / "r", progress=False).path == run.path  # reused, done
    model = psm.load(str(run.path))
    assert model.event_shape == (2,) and "1 block(s)" in repr(model)
    for call, match in [
        (lambda: model.log_prob(torch.zeros(3, 3)), r"shape \[N, 2\], got \[3, 3\]"),
        (lambda: model.bits_per_dim(torch.zeros(3, 2)), "bits/dim is for images"),
        (lambda: model.sample(4, method="langevin"), "ode or sde"),
        (lambda: model.sample(4, solver="nope"), "unknown solver"),
        (lambda: model.log_prob(torch.zeros(3, 2), steps=0), "steps must be >= 1"),
        (lambda: psm.load(tmp_path / "none"), "does not exist"),
        (lambda: psm.load(run.path, device="tpu"), "'tpu'"),
    ]:
        with pytest.raises(PSMError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
    assert model.log_prob(torch.zeros(0, 2)).shape == (0,)
    # a seed fixes the draw
    a, b = model.sample(5, seed=3, steps=4), model.sample(5, seed=3, steps=4)
    assert torch.equal(a, b) and not torch.equal(a, model.sample(5, seed=4, steps=4))
    assert model.sample(5, seed=3, method="sde", steps=4).shape == (5, 2)
