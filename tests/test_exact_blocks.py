"""Blocks replaced by the data's exact score (psm.core.exact_block, ``psm nll --exact-blocks``):
the ODE likelihood of the exact field is the data's own, block by block."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import run_cli
from psm.core.block_ode import block_ode_kl, prior_kl
from psm.core.exact_block import exact_block, with_exact_blocks
from psm.core.model import BlockModel
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


def _hg_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data: {name: hg}\npartition: {kind: splits, splits: [0, 0.01, 1], t0: 1.0e-3}\n"
        "net: {name: mlp, hidden: [8]}\n"
        "train: {steps: 20, batch_size: 16, heldout_points: 16, log_every: 10}\n"
    )
    return cfg


def test_psm_nll_exact_blocks_needs_only_the_other_blocks_and_is_not_recorded(tmp_path, capsys):
    cfg = _hg_yaml(tmp_path)
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


# ------------------------------------------------------------------ psm.core.block_ode
def _hg_model(tmp_path, scale: float = 1.0):
    """An HG run's model with both blocks the exact score, block 1's scaled by ``scale``."""
    run = _run(tmp_path)
    hg = run.dataset
    model = with_exact_blocks(load_model(run, blocks=[]), hg.marginal_score, [0, 1])
    if scale != 1.0:

        def scaled(x, a, s, differentiable=False):
            return scale * hg.marginal_score(x, a, s, differentiable=differentiable)

        blocks = list(model.blocks)
        blocks[1] = exact_block(model.process, scaled)
        model = BlockModel(model.process, model.partition, blocks, shape=model.shape)
    return run, model


def test_the_ode_kl_of_an_exact_block_is_zero(tmp_path):
    run, model = _hg_model(tmp_path)
    gen = torch.Generator().manual_seed(0)
    rows = block_ode_kl(model, run.dataset.sample, run.dataset.marginal_log_prob, points=100,
                        solver=SolverSettings("rk4", steps=100), generator=gen,
                        dtype=torch.float64)  # fmt: skip
    assert [r.block for r in rows] == [0, 1]
    for r in rows:
        assert abs(r.kl) < 0.005, r  # the solver's error only: the same on every point
    prior, se = prior_kl(model, run.dataset.sample, run.dataset.marginal_log_prob, points=2000,
                         generator=gen)  # fmt: skip
    assert -3 * se < prior < 0.01  # KL(p_1 || N(0, I)) for b(t) = 10 t: tiny, not negative


def test_the_ode_kl_of_a_wrong_block_is_what_the_whole_ode_loses_with_the_others_exact(tmp_path):
    # block 1's score scaled by 0.9: its L_b (one block's solve between exact densities) must
    # equal the NLL of the whole ODE with block 0 exact, less the data's own -log p_t0
    from psm.core.likelihood import log_likelihood

    run, model = _hg_model(tmp_path, scale=0.9)
    solver, n = SolverSettings("rk4", steps=60), 400
    gen = torch.Generator().manual_seed(1)
    (row,) = block_ode_kl(model, run.dataset.sample, run.dataset.marginal_log_prob, points=n,
                          solver=solver, generator=gen, blocks=[1],
                          dtype=torch.float64)  # fmt: skip
    x = run.dataset.test_set(n, seed=5).double()
    c = model.process.schedule(torch.tensor(1e-3, dtype=torch.float64))
    gap = -log_likelihood(model, x, solver=solver) + run.dataset.marginal_log_prob(
        x, float(c.alpha), float(c.sigma)
    )
    se = math.hypot(row.stderr, float(gap.std()) / math.sqrt(n))
    assert row.kl > 0.05  # a real loss, far above the solver's error
    assert abs(row.kl - float(gap.mean())) < 3 * se + 0.005


def test_psm_kl_ode(tmp_path, capsys):
    cfg = _hg_yaml(tmp_path)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", str(cfg), "--out", str(out), "--no-plot",
                           "--no-progress")  # fmt: skip
    assert code == 0, err
    code, text, err = run_cli(capsys, "kl", str(out), "--ode", "--points", "50", "--steps", "20")
    assert code == 0, err
    assert "KL through the probability-flow ODE by block" in text and "prior" in text
    code, text, _ = run_cli(capsys, "kl", str(out), "--ode", "--points", "50", "--steps", "20",
                            "--json")  # fmt: skip
    got = json.loads(text)
    assert got["kind"] == "ode" and len(got["blocks"]) == 2 and got["steps"] == 20
    code, _, err = run_cli(capsys, "kl", str(out), "--ode", "--zero")
    assert code == 2 and "choose one" in err
    code, _, err = run_cli(capsys, "kl", str(out), "--ode", "--estimate")
    assert code == 2 and "--ode needs" in err
