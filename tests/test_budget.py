"""Budgets from measurements (``train.budget``, ``psm train --budget``; psm.auto.budget)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from helpers import run_cli
from psm.auto.budget import (
    Plan,
    Round,
    fall_per_doubling,
    fall_rate,
    next_round,
    read_plan,
    train_budget,
    trend_gain,
)
from psm.runs.config import BudgetConfig, config_hash, parse_budget, validate_config
from psm.runs.run import Run
from psm.training.train import BlockOutcome, Recipe


# ------------------------------------------------------------------ parsing and hashing
@pytest.mark.parametrize(
    ("text", "want"),
    [(2000000, ("steps", 2e6)), ("2000", ("steps", 2000.0)), ("1h", ("seconds", 3600.0)),
     ("1h30m", ("seconds", 5400.0)), ("90s", ("seconds", 90.0)), ("45m", ("seconds", 2700.0))],
)  # fmt: skip
def test_budgets_are_block_steps_or_a_time(text, want):
    assert parse_budget(text) == want


@pytest.mark.parametrize("bad", ["", "1d", "-5", "0", "h", True, "1h-2m"])
def test_a_bad_budget_is_refused(bad):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(bad)


def test_the_budget_rule_is_hashed_and_the_plans_targets_are_not():
    base = {"train": {"lr_schedule": "cosine", "steps": 1000}}
    plain = config_hash(validate_config(base))
    a = validate_config({"train": {**base["train"], "budget": {"total": 5000}}})
    plan_fields = {"block_steps": [7], "block_decay": [3], "steps": 9}
    b = validate_config({"train": {**base["train"], "budget": {"total": "5000"}, **plan_fields}})
    c = validate_config({"train": {**base["train"], "budget": {"total": 6000}}})
    assert config_hash(a) == config_hash(b) != plain  # one spelling; targets are the plan's
    assert config_hash(c) != config_hash(a)
    rule = {r: validate_config({"train": {**base["train"], "budget": {"total": 5000, "rule": r}}})
            for r in ("rate", "trend")}  # fmt: skip
    assert config_hash(rule["rate"]) == config_hash(a) != config_hash(rule["trend"])
    # without a budget a decay start changes what a decaying block learns: hashed
    d = validate_config({"train": {**base["train"], "block_decay": [500]}})
    assert config_hash(d) != plain


def test_a_decay_start_gives_warmup_stable_decay_and_zero_keeps_the_old_schedule():
    cfg = validate_config({"train": {"lr": 1.0, "lr_schedule": "linear"}}).train
    old = Recipe(cfg, 100, torch.device("cpu"))
    assert [old.lr(s) for s in (0, 50, 99)] == [1.0, 0.5, 1.0 - 99 / 100]
    wsd = Recipe(cfg, 100, torch.device("cpu"), decay_start=60)
    assert [wsd.lr(s) for s in (0, 59, 60, 80)] == [1.0, 1.0, 1.0, 0.5]


# ------------------------------------------------------------------ the rule, pure
def _spec(**kw) -> BudgetConfig:
    return BudgetConfig(total=kw.pop("total", 1000), **kw)


def test_the_pilot_is_equal_for_every_block_in_two_halves():
    spec = _spec(pilot=0.2)
    plan = Plan(blocks=4, width=2, decays=False, total=1000)
    r0 = next_round(spec, plan, {})
    assert (r0.kind, r0.targets) == ("pilot-a", dict.fromkeys(range(4), 25))
    plan.rounds.append(r0)
    r1 = next_round(spec, plan, {})
    assert (r1.kind, r1.targets) == ("pilot-b", dict.fromkeys(range(4), 50))


def test_a_time_budget_starts_with_the_probe():
    plan = Plan(blocks=3, width=1, decays=False, total=None, seconds=60.0)
    r0 = next_round(_spec(total="1m", probe=123), plan, {})
    assert r0.targets == dict.fromkeys(range(3), 123) and "probe" in r0.reason


def test_chunks_go_to_the_fastest_falling_blocks_and_every_nth_round_explores():
    spec = _spec(total=1000, pilot=0.2, chunk=0.1, explore_every=3)
    plan = Plan(blocks=4, width=2, decays=False, total=1000)
    plan.rounds = [Round(0, "pilot-a", dict.fromkeys(range(4), 25)),
                   Round(1, "pilot-b", dict.fromkeys(range(4), 50))]  # fmt: skip
    falls = {0: 0.1, 1: 3.0, 2: 0.5, 3: 2.0}  # held-out fall over steps 25 -> 50
    obs = {b: [(25, 10.0), (50, 10.0 - f)] for b, f in falls.items()}
    r = next_round(spec, plan, obs)
    assert (r.kind, r.targets) == ("chunk", {1: 150, 3: 150})
    assert r.rates == pytest.approx({1: 3.0 / 25, 3: 2.0 / 25})
    plan.rounds.append(r)
    obs[1].append((150, obs[1][-1][1] - 0.1))  # block 1 has slowed down, block 3 has not
    obs[3].append((150, obs[3][-1][1] - 5.0))
    r = next_round(spec, plan, obs)
    assert r.targets == {3: 250, 2: 150}  # 3 (0.05/step) then 2's stale 0.02 over 1's 0.001
    plan.rounds.append(r)
    r = next_round(spec, plan, obs)  # the 3rd chunk round explores, with a quarter chunk
    assert (r.kind, r.targets) == ("explore", {0: 75, 1: 175})
    full = next_round(_spec(total=1000, pilot=0.2, chunk=0.1, explore_every=3, explore_share=1.0),
                      plan, obs)  # fmt: skip
    assert full.targets == {0: 150, 1: 250}


def test_a_negative_or_missing_rate_ranks_last_and_ties_go_to_fewer_steps():
    assert fall_rate([(10, 1.0)]) is None and fall_rate([(10, 1.0), (20, 2.0)]) == -0.1
    spec = _spec(total=1000, pilot=0.2, chunk=0.1, explore_every=0)
    plan = Plan(blocks=3, width=1, decays=False, total=1000)
    plan.rounds = [Round(0, "pilot-a", dict.fromkeys(range(3), 30)),
                   Round(1, "pilot-b", dict.fromkeys(range(3), 60))]  # fmt: skip
    obs = {0: [(30, 1.0), (60, 1.5)], 1: [(30, 1.0), (60, 0.9)], 2: [(30, 1.0), (60, 0.9)]}
    assert next_round(spec, plan, obs).targets == {1: 160}


def test_the_cooldown_shares_the_rest_by_steps_and_decays_from_each_blocks_step():
    spec = _spec(total=1000, pilot=0.2, chunk=0.1, cooldown=0.2)
    plan = Plan(blocks=2, width=1, decays=True, total=1000)
    plan.rounds = [
        Round(0, "pilot-a", {0: 50, 1: 50}),
        Round(1, "pilot-b", {0: 100, 1: 100}),
        Round(2, "chunk", {0: 700}),
    ]  # 800 of 1000 spent, 200 kept for the cool-down
    r = next_round(spec, plan, {0: [(50, 2.0), (100, 1.0), (700, 0.5)],
                                1: [(50, 2.0), (100, 1.0)]})  # fmt: skip
    assert r.kind == "cooldown"
    assert sum(r.targets.values()) - 800 == 200
    assert r.targets == {0: 700 + 175, 1: 100 + 25} and r.decay == {0: 700, 1: 100}
    plan.rounds.append(r)
    assert next_round(spec, plan, {}) is None
    assert plan.decay_starts() == [700, 100] and plan.spent() == 1000


def _simulate(curves, spec, width=1, every=None, noise=0.0, seed=0):
    """The rule against synthetic learning curves ``block -> h(steps)`` (no training), each
    measured at its rounds' ends and, with ``every``, every ``every`` steps on the way, with
    independent Gaussian noise of sd ``noise``: what a block's metrics hold."""
    rng = random.Random(seed)
    plan = Plan(blocks=len(curves), width=width, decays=spec.cooldown > 0, total=spec.total)
    obs: dict[int, list] = {}
    series: dict[int, list] = {b: [] for b in range(len(curves))}
    measured: dict[tuple[int, int], float] = {}

    def measure(b: int, s: int) -> float:
        if (b, s) not in measured:
            measured[b, s] = curves[b](s) + rng.gauss(0.0, noise)
        return measured[b, s]

    while (r := next_round(spec, plan, obs, series)) is not None:
        before = plan.targets()
        plan.rounds.append(r)
        for b, t in r.targets.items():
            if every:
                series[b] += [(s, measure(b, s)) for s in range(before[b] + every, t, every)]
            series[b].append((t, measure(b, t)))
            obs.setdefault(b, []).append((t, measure(b, t)))
    return plan


def test_a_block_made_hard_gets_most_of_the_steps_and_the_budget_is_spent_exactly():
    # held-out terms h_b(s) = c_b / sqrt(1 + s): block 2 holds 20x the removable error
    scale = [1.0, 1.0, 20.0, 1.0, 1.0]
    curves = [lambda s, c=c: c / math.sqrt(1.0 + s) for c in scale]
    spec = _spec(total=100_000, cooldown=0.0)
    plan = _simulate(curves, spec, width=1)
    steps = plan.targets()
    assert sum(steps) == 100_000
    assert steps[2] == max(steps) and steps[2] > 0.5 * sum(steps)
    assert min(steps) >= 0.1 * 100_000 / 5  # the pilot, and exploration, keep every block going


# ------------------------------------------------------------------ the trend rule
def test_the_fall_per_doubling_is_the_slope_against_log_steps_over_the_last_doubling():
    line = [(s, 3.0 - 0.2 * math.log(s)) for s in range(100, 2001, 100)]
    assert fall_per_doubling(line) == pytest.approx(0.2)
    # only the last doubling counts: an early steep fall does not inflate the trend
    bent = [(s, 5.0 - 2.0 * math.log(s)) for s in (100, 200, 400)] + line[9:]
    assert fall_per_doubling(bent) == pytest.approx(0.2)
    assert fall_per_doubling([(100, 1.0), (400, 0.5)]) == pytest.approx(0.5 / math.log(4))
    assert fall_per_doubling([(100, 1.0)]) is None and fall_per_doubling([]) is None
    # the next chunk's predicted fall per step: c ln((n + m)/n) / m
    assert trend_gain(line, 2000, 500) == pytest.approx(0.2 * math.log(2500 / 2000) / 500)
    assert trend_gain([(100, 1.0), (200, 1.5)], 200, 50) < 0  # a rising term ranks last


def test_the_trend_rule_gives_log_curves_steps_in_proportion_to_their_fall_per_doubling():
    # h_b(s) = 1 - c_b ln s: the best split of N steps minimises sum_b h_b(n_b) subject to
    # sum_b n_b = N, i.e. c_b / n_b equal for all b: n_b = N c_b / sum(c)
    c = [0.01, 0.02, 0.08, 0.03, 0.005]
    curves = [lambda s, c=c: 1.0 - c * math.log(s) for c in c]
    spec = _spec(total=200_000, cooldown=0.0, explore_every=0, rule="trend")
    steps = _simulate(curves, spec, every=1000).targets()
    assert sum(steps) == 200_000
    chunk = spec.chunk * spec.total
    for b, n in enumerate(steps):  # within one chunk of the optimum (the pilot floors block 4)
        want = max(200_000 * c[b] / sum(c), spec.pilot * spec.total / len(c))
        assert abs(n - want) <= chunk, (b, n, want)


def test_with_noisy_measurements_the_trend_rule_loses_less_than_the_rate_rule():
    # power-law curves whose chunk-to-chunk falls are below a measurement noise of 0.01 late
    # in the budget (the 2D runs' situation): one chunk's difference ranks by noise, a fit
    # over the last doubling averages it out
    height, scale = [0.3, 0.6, 1.0, 0.4, 0.2], [2000, 50000, 20000, 5000, 1000]
    curves = [lambda s, d=d, t=t: d * (1 + s / t) ** -0.5 for d, t in zip(height, scale)]

    def final(rule: str, noise: float, seed: int) -> float:
        spec = _spec(total=400_000, cooldown=0.0, rule=rule)
        plan = _simulate(curves, spec, every=1000, noise=noise, seed=seed)
        return sum(curves[b](n) for b, n in enumerate(plan.targets()))

    clean = final("trend", 0.0, 0)
    rate = [final("rate", 0.01, s) for s in range(8)]
    trend = [final("trend", 0.01, s) for s in range(8)]
    assert sum(trend) / 8 - clean < 0.25 * (sum(rate) / 8 - clean)
    assert sum(t < r for t, r in zip(trend, rate)) >= 7


# ------------------------------------------------------------------ the driver
class FakeExecutor:
    """Trains nothing: marks each block done at its target and logs a held-out term from a
    synthetic curve (what a real block's metrics would hold)."""

    def __init__(self, curves, stop_at_call: int | None = None):
        self.curves, self.calls, self.stop_at_call = curves, 0, stop_at_call

    def run(self, run: Run, blocks):
        self.calls += 1
        if self.stop_at_call == self.calls:
            return [BlockOutcome(b, "interrupted") for b in blocks]
        outs = []
        for b in blocks:
            target = run.config.step_target(b)
            run.layout.weights(b).write_bytes(b"w")
            with run.layout.metrics(b).open("a") as f:
                f.write(json.dumps({"step": target, "heldout": self.curves[b](target)}) + "\n")
            run.ledger.write(b, state="done", step=target, target=target)
            outs.append(BlockOutcome(b, "done", target))
        return outs


class SeriesExecutor(FakeExecutor):
    """As :class:`FakeExecutor`, with a held-out term every ``every`` steps on the way to the
    target, as the trainer's ``train.heldout_every`` writes them."""

    def __init__(self, curves, every: int, stop_at_call: int | None = None):
        super().__init__(curves, stop_at_call)
        self.every = every

    def run(self, run: Run, blocks):
        for b in blocks:
            done = int((run.ledger.read(b) or {}).get("step") or 0)
            target = run.config.step_target(b)
            with run.layout.metrics(b).open("a") as f:
                for s in range((done // self.every + 1) * self.every, target, self.every):
                    f.write(json.dumps({"step": s, "heldout": self.curves[b](s)}) + "\n")
        return super().run(run, blocks)


def _budget_cfg(tmp_path, name, total=6000, rule="rate", **train):
    raw = {
        "name": name, "out": str(tmp_path / name), "data": {"name": "ty"},
        "partition": {"kind": "equal", "blocks": 3}, "net": {"name": "mlp", "hidden": [8]},
        "train": {"budget": {"total": total, "chunk": 0.05, "rule": rule},
                  "lr_schedule": "cosine", **train},
        "executor": {"name": "local", "workers": 2},
    }  # fmt: skip
    return validate_config(raw)


CURVES = [lambda s: 1.0 / (1 + s) ** 0.5, lambda s: 9.0 / (1 + s) ** 0.5, lambda s: 1.0 / (1 + s)]


def test_the_driver_records_the_plan_and_leaves_an_ordinary_run(tmp_path):
    cfg = _budget_cfg(tmp_path, "a")
    run, _ = train_budget(cfg, FakeExecutor(CURVES), log=lambda line: None)
    plan = read_plan(run.path)
    assert plan is not None and plan.width == 2 and plan.total == 6000
    assert plan.spent() == 6000 and plan.rounds[-1].kind == "cooldown"
    assert plan.targets()[1] == max(plan.targets())
    reopened = Run.open(run.path)  # the config on disk carries the plan's targets
    assert list(reopened.config.train.block_steps) == plan.targets()
    assert list(reopened.config.train.block_decay) == plan.decay_starts()
    assert reopened.ledger.not_done() == [] and reopened.hash == run.hash
    assert all(r.reason for r in plan.rounds)
    assert max(len(r.targets) for r in plan.rounds if r.kind in ("chunk", "explore")) == 2
    from psm.viz.budget import plot_budget

    png = plot_budget(reopened)
    assert png == run.path / "budget.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_a_stopped_budget_run_resumed_gives_the_same_plan_as_an_unstopped_one(tmp_path):
    whole, _ = train_budget(_budget_cfg(tmp_path, "whole"), FakeExecutor(CURVES),
                            log=lambda line: None)  # fmt: skip
    cfg = _budget_cfg(tmp_path, "stopped")
    run, outs = train_budget(cfg, FakeExecutor(CURVES, stop_at_call=5), log=lambda line: None)
    assert {o.state for o in outs} == {"interrupted"}
    partial = read_plan(run.path)
    assert partial is not None and len(partial.rounds) == 5  # the 5th recorded, not trained
    run, _ = train_budget(cfg, FakeExecutor(CURVES), log=lambda line: None)
    a, b = read_plan(whole.path), read_plan(run.path)
    strip = lambda p: [(r.kind, r.targets, r.decay, r.rates) for r in p.rounds]  # noqa: E731
    assert strip(a) == strip(b)
    # a repeated call after the end trains nothing
    fake = FakeExecutor(CURVES)
    train_budget(cfg, fake, log=lambda line: None)
    assert fake.calls == 0


def test_the_trend_rule_reads_every_measurement_and_resumes_to_the_same_plan(tmp_path):
    curves = [lambda s: 1.0 - 0.02 * math.log(s), lambda s: 1.0 - 0.10 * math.log(s),
              lambda s: 1.0 - 0.04 * math.log(s)]  # fmt: skip
    lines: list[str] = []
    whole, _ = train_budget(_budget_cfg(tmp_path, "whole", rule="trend"),
                            SeriesExecutor(curves, every=50), log=lines.append)  # fmt: skip
    plan = read_plan(whole.path)
    assert plan.rule == "trend" and plan.spent() == 6000
    chunks = [r for r in plan.rounds if r.kind == "chunk"]
    first = chunks[0]  # after the pilot (200 steps each), chunks of 300: c_b ln(500/200)/300
    gain = math.log(500 / 200) / 300
    assert first.rates == pytest.approx({1: 0.10 * gain, 2: 0.04 * gain})
    assert any("would fall" in line for line in lines)
    steps = plan.targets()
    assert steps[1] == max(steps) and steps[0] == min(steps)
    cfg = _budget_cfg(tmp_path, "stopped", rule="trend")
    run, _ = train_budget(cfg, SeriesExecutor(curves, 50, stop_at_call=6), log=lambda line: None)
    run, _ = train_budget(cfg, SeriesExecutor(curves, 50), log=lambda line: None)
    strip = lambda p: [(r.kind, r.targets, r.decay, r.rates) for r in p.rounds]  # noqa: E731
    assert strip(read_plan(run.path)) == strip(plan)


def test_a_time_budget_turns_seconds_into_block_steps_with_the_probes_rate(tmp_path, monkeypatch):
    import psm.auto.budget as budget

    clock = iter([0.0, 2.0] + [float(i) for i in range(10, 1000)])
    monkeypatch.setattr(budget.time, "perf_counter", lambda: next(clock))
    cfg = _budget_cfg(tmp_path, "t", total="1m", lr_schedule="constant")
    lines: list[str] = []
    run, _ = train_budget(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"budget": BudgetConfig(total="1m", probe=100, chunk=0.05)})}),
        FakeExecutor(CURVES), log=lines.append)  # fmt: skip
    plan = read_plan(run.path)
    assert plan.rate == pytest.approx(300 / 2.0)  # 3 blocks x 100 probe steps in 2 s
    # the first total, 150 x 60 = 9,000, set the pilot's second half: to 300 steps per block,
    # 600 block-steps in 1 s (the clock's next tick); that rate re-sets the total once
    assert plan.rounds[1].kind == "pilot-b" and plan.rounds[1].targets[0] == 300
    assert plan.steady_rate == pytest.approx(600.0)
    assert plan.total == 900 + 600 * (60 - 2 - 1)  # spent + rate x the seconds left
    assert plan.spent() == plan.total
    assert any("block-steps/s" in line for line in lines)
    assert any("pilot's second half ran 600 block-steps" in line for line in lines)


def test_a_budget_needs_the_heldout_signal(tmp_path):
    cfg = _budget_cfg(tmp_path, "h", heldout_every=0)
    with pytest.raises(Exception, match="heldout_every"):
        train_budget(cfg, FakeExecutor(CURVES), log=lambda line: None)


# ------------------------------------------------------------------ end to end
def test_psm_train_budget_end_to_end_tiny(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data: {name: ty}\npartition: {kind: equal, blocks: 2}\n"
        "net: {name: mlp, hidden: [16]}\n"
        "train: {batch_size: 32, log_every: 20, heldout_points: 32, checkpoint_every: 100}\n"
        "executor: {name: local, workers: 1}\neval: {n_test: 64, steps: 10}\n"
    )
    out = tmp_path / "run"
    argv = ["train", str(cfg), "--budget", "400", "--out", str(out), "--no-plot", "--no-progress"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "budget round 0 [pilot-a]" in err and "budget spent: 400 of 400" in err
    plan = read_plan(out)
    assert plan.spent() == 400
    code, _, err = run_cli(capsys, "nll", str(out), "--no-progress")
    assert code == 0, err  # an ordinary run for the other commands
    code, text, _ = run_cli(capsys, "status", str(out))
    assert code == 0 and "budget 400: 400/400 block-steps in" in text
    code, text, _ = run_cli(capsys, "status", str(out), "--json")
    assert json.loads(text)["budget"]["spent"] == 400
    code, _, err = run_cli(capsys, *argv, "--blocks", "0")
    assert code == 2 and "--budget" in err
