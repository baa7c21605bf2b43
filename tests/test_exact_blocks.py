"""Blocks replaced by the data's exact score (psm.core.exact_block, ``psm nll --exact-blocks``):
the ODE likelihood of the exact field is the data's own, block by block."""

from __future__ import annotations

import pytest
import torch

from helpers import run_cli
from psm.core.exact_block import exact_block, with_exact_blocks
from psm.core.ode import SolverSettings
from psm.core.process import make_process
from psm.data.mixture import paper_toy
from psm.runs.config import validate_config
from psm.runs.inference import evaluate_run, load_model
from psm.runs.run import Run


def _run(tmp_path, prediction=None, data="hg"):
    raw = {
        "out": str(tmp_path / "run"), "data": {"name": data},
        "partition": {"kind": "splits", "splits": [0, 0.01, 1], "t0": 1e-3},
        "net": {"name": "mlp", "hidden": [8]},
        "train": {"steps": 20, "batch_size": 16, "heldout_points": 16, "log_every": 10},
        "executor": {"name": "local", "workers": 1},
    }  # fmt: skip
    if prediction:
        raw["process"] = {"name": "vp", "prediction": prediction}
    return Run.create(validate_config(raw))


@pytest.mark.parametrize("prediction", [None, "score", "v"])
def test_an_exact_block_returns_the_exact_score_in_any_parameterisation(tmp_path, prediction):
    run = _run(tmp_path, prediction)
    model = with_exact_blocks(load_model(run, blocks=[]), run.dataset.marginal_score, [0, 1])
    x = torch.randn(64, 2, dtype=torch.float64)
    for t in (2e-3, 0.3):
        c = model.process.schedule(torch.tensor(t, dtype=torch.float64))
        want = run.dataset.marginal_score(x, float(c.alpha), float(c.sigma))
        got = model.score(x, torch.full((64,), t, dtype=torch.float64))
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def test_the_exact_field_gives_the_datas_own_log_density_at_t0(tmp_path):
    # every block exact: the probability-flow ODE of the true marginals, so the NLL of each test
    # point is -log p_t0(x) up to the solver's error (RK4, 200 steps, float64)
    run = _run(tmp_path)
    ev = evaluate_run(run, n=64, solver=SolverSettings("rk4", steps=200), trace="exact",
                      dtype=torch.float64, exact_blocks=[0, 1], progress=False)  # fmt: skip
    x = run.dataset.test_set(64, seed=run.config.eval.test_seed).double()
    c = run.parts.process.schedule(torch.tensor(1e-3, dtype=torch.float64))
    want = -run.dataset.marginal_log_prob(x, float(c.alpha), float(c.sigma))
    diff = ev.result.values.double() - want
    assert abs(float(diff.mean())) < 0.01
    assert float(diff.abs().max()) < 0.1


def test_an_exact_block_keeps_its_graph_for_the_trace():
    hg = paper_toy("hg")
    process = make_process("vp", b_min=0.1, b_max=20.0)
    block = exact_block(process, hg.marginal_score)
    x = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    out = block(x, torch.full((8,), 0.05, dtype=torch.float64))
    (g,) = torch.autograd.grad(out[:, 0].sum(), x)
    eps = 1e-6
    xp = x.detach().clone()
    xp[:, 0] += eps
    fd = (block(xp, torch.full((8,), 0.05, dtype=torch.float64))[:, 0] - out[:, 0].detach()) / eps
    torch.testing.assert_close(g[:, 0], fd, rtol=1e-3, atol=1e-4)


def test_psm_nll_exact_blocks_needs_only_the_other_blocks_and_is_not_recorded(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data: {name: hg}\npartition: {kind: splits, splits: [0, 0.01, 1], t0: 1.0e-3}\n"
        "net: {name: mlp, hidden: [8]}\n"
        "train: {steps: 20, batch_size: 16, heldout_points: 16, log_every: 10}\n"
    )
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", str(cfg), "--out", str(out), "--blocks", "1",
                           "--no-plot", "--no-progress")  # fmt: skip
    assert code == 0, err
    nll = ["nll", str(out), "--n", "32", "--steps", "20", "--no-progress"]
    code, text, err = run_cli(capsys, *nll, "--exact-blocks", "0")  # block 1 is the run's
    assert code == 0, err
    assert "blocks 0 replaced by the exact score" in text
    assert "not appended" in err and not (out / "nll.jsonl").exists()
    code, _, err = run_cli(capsys, *nll, "--exact-blocks", "1")
    assert code == 2 and "block(s) 0 not done" in err  # block 0 is the run's: it must be trained
    code, _, err = run_cli(capsys, *nll, "--exact-blocks", "2")
    assert code == 2 and "blocks 0-1" in err
