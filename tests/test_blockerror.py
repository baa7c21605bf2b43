"""The KL bound split by block (psm.core.block_kl, psm kl) against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from helpers import one_line_error, run_cli, tiny_config
from psm.core.block_kl import block_kl
from psm.core.model import BlockModel
from psm.core.partition import splits
from psm.core.process import make_process
from psm.data.mixture import paper_toy
from test_likelihood import MIXTURE

D64 = torch.float64
PARTITION = splits([0.0, 0.003, 0.03, 0.3, 1.0], t0=1e-4)


def exact_score(process):
    """The Gaussian mixture's exact marginal score, in block_kl's ``(x, α, σ)`` form."""

    def score(x, alpha, sigma):
        # the test mixture's marginals are indexed by t: find t from σ on the VP path
        t = _t_of_sigma(process, sigma)
        with torch.enable_grad():
            z = x.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(MIXTURE.log_prob(process, z, t).sum(), z)
        return g

    return score


def _t_of_sigma(process, sigma: float) -> float:
    # VP with b(t) = 10 t: σ² = 1 - exp(-5 t²)
    return math.sqrt(-math.log(1.0 - sigma * sigma) / 5.0)


def model_with_offset(process, c: torch.Tensor) -> BlockModel:
    """Every block outputs the exact ε plus a constant vector ``c``."""
    exact = MIXTURE.block(process)
    blocks = [lambda x, t: exact(x, t) + c] * PARTITION.num_blocks
    return BlockModel(process, PARTITION, blocks)


def test_the_exact_model_has_no_error_in_any_block():
    process = make_process("vp")
    rows = block_kl(
        model_with_offset(process, torch.zeros(2, dtype=D64)), MIXTURE.sample,
        exact_score(process), points=500, times=8, dtype=D64,
    )  # fmt: skip
    assert [r.block for r in rows] == [0, 1, 2, 3]
    assert all(abs(r.kl) < 1e-12 for r in rows)


def test_a_constant_error_in_epsilon_gives_the_closed_form_kl_per_block():
    """ε_θ = ε* + c makes ‖s_θ − s*‖² = |c|²/σ², so each block's term is
    ½ |c|² ∫ b/σ² dt = ½ |c|² [log(e^B − 1)] between its ends (VP, B = ∫b)."""
    process = make_process("vp")
    c = torch.tensor([0.3, -0.4], dtype=D64)
    rows = block_kl(
        model_with_offset(process, c), MIXTURE.sample, exact_score(process),
        points=50, times=32, dtype=D64,
    )  # fmt: skip

    def antiderivative(t: float) -> float:
        big_b = 5.0 * t * t
        return math.log(math.expm1(big_b))

    for r in rows:
        want = 0.5 * 0.25 * (antiderivative(r.t_hi) - antiderivative(r.t_lo))
        assert r.kl == pytest.approx(want, rel=2e-3), r
        assert r.stderr < 1e-9 * max(1.0, want)  # no Monte Carlo noise: the error is constant


def test_mixture_marginal_score_matches_finite_differences():
    mix = paper_toy("ty")
    x = mix.sample(200, torch.Generator().manual_seed(1)).to(D64) * 0.9
    score = mix.marginal_score(x, 0.9, 0.05)
    h = 1e-6
    for k in range(2):
        d = torch.zeros_like(x)
        d[:, k] = h
        fd = mix.marginal_log_prob(x + d, 0.9, 0.05) - mix.marginal_log_prob(x - d, 0.9, 0.05)
        torch.testing.assert_close(score[:, k], fd / (2 * h), rtol=1e-5, atol=1e-5)


def test_psm_kl_prints_one_row_per_block_and_their_total(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(train={"steps": 10})))
    out = tmp_path / "r"
    assert run_cli(capsys, "train", cfg, "--out", out, "--no-progress", "--no-plot")[0] == 0
    code, text, err = run_cli(capsys, "kl", out, "--points", "100", "--times", "4", "--json")
    assert code == 0, err
    import json

    rec = json.loads(text)
    assert [b["block"] for b in rec["blocks"]] == [0, 1, 2]
    assert rec["total"] == pytest.approx(sum(b["kl"] for b in rec["blocks"]))
    assert all(b["kl"] > 0 for b in rec["blocks"])  # 10 steps learn little
    code, text, _ = run_cli(capsys, "kl", out, "--points", "100", "--times", "4")
    assert code == 0 and text.count("\n") == 6 and "total" in text


def test_psm_kl_estimates_data_without_an_exact_density(tmp_path, capsys):
    """Without an exact density, psm kl gives the held-out denoising bound (up to a constant,
    psm.core.heldout), labelled as such."""
    pts = tmp_path / "p.npy"
    np.save(pts, np.random.default_rng(0).normal(size=(200, 2)).astype(np.float32))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(data={"name": "points", "path": str(pts)},
                                              train={"steps": 5})))  # fmt: skip
    out = tmp_path / "r"
    assert run_cli(capsys, "train", cfg, "--out", out, "--no-progress", "--no-plot")[0] == 0
    code, text, err = run_cli(capsys, "kl", out, "--points", "10", "--times", "2")
    assert code == 0, err
    assert "up to a constant (held-out denoising bound)" in text
    one_line_error(capsys, "kl", out, "--points", "1", match="--points")
