"""The held-out denoising bound (psm.core.heldout): its maths against closed forms, the signal the
trainer writes, and what psm status and psm kl make of it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_cli
from psm.commands.status import _slope, heldout_signal
from psm.core.heldout import (
    HELDOUT_SEED,
    heldout_batch,
    heldout_error,
    heldout_estimate,
    heldout_term,
)
from psm.core.model import BlockModel
from psm.core.partition import equal, splits
from psm.core.process import make_process
from psm.runs.inference import load_model
from psm.runs.run import Run
from psm.training.train import SEED_HELDOUT, block_seed, train_block, train_ensemble

D64 = torch.float64
MU, S, DIM = torch.tensor([0.3, -0.2, 0.1], dtype=D64), 0.5, 3  # data N(μ, s² I) in 3 dims


# ------------------------------------------------------------------ Gaussian data, closed forms
def gaussian_model(process, partition, kappa: float, delta: torch.Tensor) -> BlockModel:
    """A model whose score is ``(1 + κ α_t) s*(x, t) + α_t δ``, ``s*`` the exact score of
    ``N(α μ, (α² s² + σ²) I)``: its error vanishes where ``α = 0`` (OT at t = 1, where g² blows
    up), and the block terms have closed forms."""
    eps_process = process.with_prediction("epsilon")

    def block(x, t):
        c = process.schedule(t.to(D64))
        a, s = c.alpha[:, None], c.sigma[:, None]
        v = a * a * S * S + s * s
        exact = -(x.to(D64) - a * MU) / v
        score = (1 + kappa * a) * exact + a * delta
        eps = -s * score
        if process.prediction == "epsilon":
            return eps.to(x.dtype)
        return eps_process.velocity(eps, x.to(D64), t.to(D64)).to(x.dtype)

    return BlockModel(process, partition, [block] * partition.num_blocks)


def log_quadrature(process, lo: float, hi: float, integrand, nodes: int = 200_000) -> float:
    """``∫_lo^hi integrand(α, σ, g²) dt`` by the midpoint rule in log t (fine)."""
    e = torch.linspace(math.log(lo), math.log(hi), nodes + 1, dtype=D64)
    t = torch.exp(0.5 * (e[1:] + e[:-1]))
    c = process.schedule(t)
    return float((integrand(c.alpha, c.sigma, c.g2) * t).sum() * (e[1] - e[0]))


def exact_term(process, lo, hi, kappa, delta) -> float:
    """The block's KL term ``∫ ½ g² E‖s_θ − s*‖² dt = ∫ ½ g² α² (κ² d / v + ‖δ‖²) dt``."""
    d2 = float(delta.pow(2).sum())

    def f(a, s, g2):
        return 0.5 * g2 * a * a * (kappa**2 * DIM / (a * a * S * S + s * s) + d2)

    return log_quadrature(process, lo, hi, f)


def constant(process, lo, hi) -> float:
    """``C_b = ∫ ½ g² d (1/σ² − 1/(α² s² + σ²)) dt`` (module docstring of psm.core.heldout):
    ``E‖ε/σ‖² = d/σ²`` minus ``E‖∇ log p_t‖² = d/v`` for Gaussian data."""

    def f(a, s, g2):
        return 0.5 * g2 * DIM * (1 / (s * s) - 1 / (a * a * S * S + s * s))

    return log_quadrature(process, lo, hi, f)


def gaussian_points(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + S * torch.randn(n, DIM, generator=g, dtype=D64)


@pytest.mark.parametrize("name", ["vp", "ot"])
def test_estimate_minus_the_constant_is_the_exact_block_term(name):
    """``D̂_b − C_b`` equals the exact block term within Monte Carlo error, for VP
    (ε-prediction) and OT (velocity) alike, and an exact model's estimate is ``C_b``."""
    process = make_process(name)
    partition = splits([0.0, 0.05, 0.4, 1.0], t0=1e-3)
    delta = torch.tensor([0.4, -0.3, 0.2], dtype=D64)
    x0 = gaussian_points(20_000)
    for kappa, dl in ((0.6, delta), (0.0, 0 * delta)):
        model = gaussian_model(process, partition, kappa, dl)
        rows = heldout_estimate(model, x0, generator=torch.Generator().manual_seed(2), dtype=D64)
        assert [r.block for r in rows] == [0, 1, 2]
        for r in rows:
            want = exact_term(process, r.t_lo, r.t_hi, kappa, dl)
            got = r.kl - constant(process, r.t_lo, r.t_hi)
            assert abs(got - want) < 4 * r.stderr, (name, kappa, r, got, want)
            if kappa and r.block > 0:  # the check can tell a wrong term apart (near t0 the
                assert want > 5 * r.stderr  # constant's noise dominates a single value)


@pytest.mark.parametrize("name", ["vp", "ot"])
def test_on_a_fixed_batch_the_change_of_the_estimate_is_the_change_of_the_term(name):
    """Two models on one fixed held-out batch: the network-free noise cancels, so the difference
    of the estimates matches the difference of the exact terms to a far smaller error than
    either estimate's own (what the trainer's fixed batch relies on)."""
    process = make_process(name)
    lo, hi = 1e-4, 0.3
    x0 = gaussian_points(4096, seed=3)
    batch = heldout_batch(process, lo, hi, x0, torch.Generator().manual_seed(4))
    assert batch.size == 4096 and batch.t.min() >= lo and batch.t.max() <= hi
    # one time per stratum of log t
    strata = ((batch.t.log() - math.log(lo)) / (math.log(hi / lo) / 4096)).floor().long()
    assert torch.equal(strata.sort().values, torch.arange(4096))
    da, db = torch.tensor([0.3, 0.0, -0.2], dtype=D64), torch.tensor([0.0, 0.1, 0.0], dtype=D64)
    part = equal(1, t0=lo)
    errs, ses = [], []
    for kappa, delta in ((0.5, da), (-0.2, db)):
        model = gaussian_model(process, part, kappa, delta)
        x = batch.x_t.to(D64)
        score = model.score(x, batch.t, 0)
        out = model.output(x, batch.t, 0)
        value, se = heldout_error(batch, score)
        assert heldout_term(process, batch, out) == pytest.approx((value, se), rel=1e-9)
        errs.append((score - batch.target).pow(2).sum(1))
        ses.append(se)
    v = batch.size * batch.weight * (errs[0] - errs[1])
    diff, diff_se = float(v.mean()), float(v.std() / math.sqrt(batch.size))
    want = exact_term(process, lo, hi, 0.5, da) - exact_term(process, lo, hi, -0.2, db)
    assert abs(diff - want) < 4 * diff_se and diff_se < 0.25 * min(ses)


def test_a_grid_batch_feeds_the_net_its_net_time():
    process = make_process("vp")
    batch = heldout_batch(process, 0.1, 0.2, gaussian_points(64), torch.Generator(), net_time=0.2)
    assert torch.all(batch.t_net == 0.2) and torch.all(batch.t_eff == 0.2)
    assert torch.all((batch.t >= 0.1) & (batch.t <= 0.2))
    with pytest.raises(ValueError, match="0 < t_lo"):
        heldout_batch(process, 0.0, 0.2, gaussian_points(4), torch.Generator())


# ------------------------------------------------------------------ the trainer's signal
def metric_lines(run: Run, b: int) -> list[dict]:
    return [json.loads(x) for x in run.layout.metrics(b).read_text().splitlines()]


def heldout_steps(run: Run, b: int) -> list[int]:
    return [r["step"] for r in metric_lines(run, b) if "heldout" in r]


def test_the_signal_is_written_every_heldout_every_steps_and_at_each_calls_end(make_run):
    run = make_run(train={"steps": 25, "log_every": 7, "heldout_every": 10})
    train_ensemble(run)
    for b in range(3):
        assert heldout_steps(run, b) == [10, 20, 25]
        rec = run.ledger.read(b)
        last = [r for r in metric_lines(run, b) if "heldout" in r][-1]
        assert rec["heldout_step"] == 25 and rec["heldout"] == last["heldout"]
        assert "loss" in last and math.isfinite(last["heldout"])
    # a second call extends the blocks: measured again at its own end
    run = Run.create(run.config.model_copy(update={"train": run.config.train.model_copy(
        update={"steps": 32})}), run.path)  # fmt: skip
    train_block(run, 1)
    assert heldout_steps(run, 1) == [10, 20, 25, 30, 32]
    assert run.ledger.read(1)["heldout_step"] == 32


def test_heldout_every_zero_writes_none(make_run):
    run = make_run(train={"steps": 20, "heldout_every": 0})
    train_ensemble(run)
    for b in range(3):
        assert heldout_steps(run, b) == [] and "heldout" not in run.ledger.read(b)


def weights_and_states(run: Run) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((run.path / "blocks").glob("*.safetensors")):
        out |= {f"{f.name}/{k}": v for k, v in load_file(f).items()}
    return out


@pytest.mark.parametrize("stacked", [True, False])
def test_training_is_bit_for_bit_the_same_with_and_without_the_signal(make_run, stacked):
    """Weights, EMA, Adam moments and generator states are identical (dropout on: the global
    generator is untouched too)."""
    runs = []
    for every in (0, 3):
        run = make_run(net={"hidden": [16, 16], "dropout": 0.1},
                       train={"steps": 20, "heldout_every": every, "ema": 0.9})  # fmt: skip
        if stacked:
            train_ensemble(run)
        else:
            for b in range(3):
                train_block(run, b)
        runs.append(weights_and_states(run))
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) > 0
    for k, v in runs[0].items():
        assert torch.equal(v, runs[1][k]), k


@pytest.mark.parametrize(
    ("partition", "stacked", "ema"),
    [({"kind": "equal", "blocks": 3}, True, 0.9),
     ({"kind": "grid", "points": [0.05, 0.3, 1.0]}, False, None)],
)  # fmt: skip
def test_the_trainers_value_is_that_of_the_saved_inference_weights(
    make_run, partition, stacked, ema
):
    """The value at the end of a call is the held-out bound of the weights inference loads (the
    EMA when kept; a grid block's net at its net time), on the block's own batch."""
    run = make_run(partition=partition, train={"steps": 15, "heldout_every": 100, "ema": ema})
    if stacked:
        train_ensemble(run)
    else:
        for b in range(run.num_blocks):
            train_block(run, b)
    model = load_model(run)
    x0 = run.dataset.test_set(run.config.train.heldout_points, seed=HELDOUT_SEED)
    for seg in run.partition.segments():
        gen = torch.Generator().manual_seed(block_seed(run.config.train.seed, seg.block,
                                                       SEED_HELDOUT))  # fmt: skip
        tau = model.net_time(seg.block) if model.is_grid else None
        batch = heldout_batch(run.process, seg.t_lo, seg.t_hi, x0, gen, net_time=tau)
        with torch.no_grad():
            score = model.score(batch.x_t, batch.t.float(), seg.block)
        value, _ = heldout_error(batch, score)
        assert run.ledger.read(seg.block)["heldout"] == pytest.approx(value, rel=1e-5)


# ------------------------------------------------------------------ psm status, psm kl
def test_status_shows_the_last_value_and_its_slope(make_run, capsys):
    run = make_run(train={"steps": 60, "heldout_every": 10})
    train_ensemble(run)
    out = run.path
    code, text, err = run_cli(capsys, "status", out, "--json")
    assert code == 0, err
    rows = json.loads(text)["blocks"]
    for b, row in enumerate(rows):
        series = [(r["step"], r["heldout"]) for r in metric_lines(run, b) if "heldout" in r]
        assert row["heldout"] == series[-1][1] and row["heldout_step"] == 60
        steps, values = zip(*series[-5:])
        assert row["heldout_slope"] == pytest.approx(_slope(list(steps), list(values)))
    code, text, _ = run_cli(capsys, "status", out)
    assert code == 0 and "held-out" in text and "slope/1k" in text
    lines = [x for x in text.splitlines() if x.strip()[:1].isdigit()]
    assert len(lines) == 3 and all(f"{rows[b]['heldout']:.5g}" in lines[b] for b in range(3))


def test_the_slope_is_least_squares_per_1000_steps(tmp_path):
    assert _slope([1000, 2000, 3000], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert _slope([1000], [1.0]) is None
    path = tmp_path / "m.jsonl"
    lines = [{"step": s, "loss": 1.0} for s in (100, 200)]
    lines += [{"step": 1000 * i, "loss": 1.0, "heldout": 10.0 - 0.5 * i} for i in range(1, 8)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    sig = heldout_signal(path)
    assert sig == {"heldout": 6.5, "heldout_step": 7000, "heldout_slope": pytest.approx(-0.5)}
    assert heldout_signal(tmp_path / "none.jsonl")["heldout"] is None


def test_kl_estimate_on_a_trained_toy_run(make_run, capsys):
    """--estimate on a mixture gives the held-out bound, labelled up to a constant; between two
    checkpoints of a tiny MLP its change per block is the change of the exact term."""
    run = make_run(partition={"kind": "equal", "blocks": 2},
                   train={"steps": 20, "batch_size": 128, "heldout_every": 0})  # fmt: skip
    flags = ("--points", "200", "--times", "4", "--json")
    results = []
    for steps in (20, 200):
        train = run.config.train.model_copy(update={"steps": steps})
        run = Run.create(run.config.model_copy(update={"train": train}), run.path)
        train_ensemble(run)
        code, text, err = run_cli(capsys, "kl", run.path, "--estimate", *flags)
        assert code == 0, err
        est = json.loads(text)
        assert est["kind"] == "estimate" and est["up_to_constant"] and est["held_out"] == 800
        exact = json.loads(run_cli(capsys, "kl", run.path, *flags)[1])
        assert exact["kind"] == "exact" and not exact["up_to_constant"]
        results.append((est["blocks"], exact["blocks"]))
    (e0, x0), (e1, x1) = results
    for b in range(2):
        d_est, d_exact = e1[b]["kl"] - e0[b]["kl"], x1[b]["kl"] - x0[b]["kl"]
        se = math.hypot(x0[b]["stderr"], x1[b]["stderr"])
        assert abs(d_est - d_exact) < 4 * se + 0.15 * abs(d_exact), (b, d_est, d_exact, se)
    code, text, _ = run_cli(capsys, "kl", run.path, "--estimate", "--points", "50", "--times", "2")
    assert code == 0 and "up to a constant (held-out denoising bound)" in text
    assert "KL + C" in text


def test_a_grid_block_below_t0_has_no_value_and_the_others_do(make_run):
    """A grid cell that ends below t0 has no integration segment, hence no held-out term."""
    run = make_run(partition={"kind": "grid", "points": [1e-5, 0.1, 1.0], "t0": 1e-4},
                   train={"steps": 10})  # fmt: skip
    assert [s.block for s in run.partition.segments()] == [1, 2]
    train_ensemble(run)
    assert [heldout_steps(run, b) for b in range(3)] == [[], [10], [10]]
