"""The training objective seam: one :class:`~psm.core.objective.Objective` per block owns its
times, pairs and loss weights; the default reproduces psm's draws bit for bit, an objective
registered from outside the package trains through the one loop, and the config hash moves
only for a non-default objective."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar, Literal

import pytest
import torch
import yaml
from pydantic import Field

from helpers import one_line_error, tiny_config
from pinned_hashes import PINNED_HASHES
from psm.core.objective import (
    OBJECTIVES,
    MSEObjective,
    MSESpec,
    Objective,
    ObjectiveSpec,
    stack_batches,
)
from psm.core.process import make_process
from psm.errors import ConfigError
from psm.runs.config import (
    config_hash,
    hashed_differences,
    legacy_config_hash,
    load_config,
    validate_config,
)
from psm.training.train import BlockProblem, StackTrainer, train_block, train_ensemble

CONFIGS = Path(__file__).parents[1] / "configs"


# ------------------------------------------------------------------ a toy objective, from outside
class TopObjective(Objective):
    """Every sample at the block's upper end ``t_hi``, weighted by ``weight`` (1: unweighted).
    Draws no random number for its times; records the times it drew."""

    drawn: ClassVar[list[tuple[int, torch.Tensor]]] = []  # (id of the objective, t)

    def __init__(self, process, t_lo, t_hi, weight: float) -> None:
        super().__init__(process, t_lo, t_hi)
        self.weight = weight

    def times(self, n, generator, device):
        t = torch.full((n,), self.t_hi, device=device)
        TopObjective.drawn.append((id(self), t))
        return t, None if self.weight == 1.0 else torch.full((n,), self.weight, device=device)


class TopSpec(ObjectiveSpec):
    name: Literal["top"] = "top"
    weight: float = Field(1.0, gt=0.0)

    def build(self, process, t_lo, t_hi) -> Objective:
        return TopObjective(process, t_lo, t_hi, self.weight)


@pytest.fixture
def top():
    """``train.objective: {name: top}`` registered for one test."""
    OBJECTIVES.register(TopSpec)
    TopObjective.drawn.clear()
    yield TopSpec
    OBJECTIVES.unregister(TopSpec)
    TopObjective.drawn.clear()


def first_losses(run, blocks) -> list[float]:
    """The loss logged at step 1 by each block."""
    out = []
    for b in blocks:
        line = json.loads(run.layout.metrics(b).read_text().splitlines()[0])
        assert line["step"] == 1
        out.append(line["loss"])
    return out


@pytest.mark.parametrize("trainer", ["block", "ensemble"])
def test_a_registered_objective_is_what_the_blocks_learn_from(make_run, top, trainer):
    """Through train_block and train_ensemble: the times are the objective's (each block's
    upper end), and its weights reach the loss (weight 2 doubles the logged step-1 loss, to
    the bit: the same data, noise and init, one factor 2 in every term)."""
    blocks = [1] if trainer == "block" else [0, 1, 2]
    losses = {}
    for w in (1.0, 2.0):
        run = make_run(train={"log_every": 1, "objective": {"name": "top", "weight": w}})
        assert run.config.train.objective == TopSpec(weight=w)
        TopObjective.drawn.clear()
        if trainer == "block":
            assert train_block(run, 1).state == "done"
        else:
            assert [o.state for o in train_ensemble(run)] == ["done"] * 3
        his = {run.partition.train_range(b)[1] for b in blocks}
        seen = {float(t[0]) for _, t in TopObjective.drawn}
        assert all(bool((t == t[0]).all()) for _, t in TopObjective.drawn)
        assert len(TopObjective.drawn) == 20 * len(blocks)  # one draw per block and step
        assert seen == {torch.tensor(h).item() for h in his}  # float32 of each t_hi
        losses[w] = first_losses(run, blocks)
    assert losses[2.0] == [2 * v for v in losses[1.0]]


def test_a_run_of_another_objective_reopens_with_it(make_run, top):
    run = make_run(train={"objective": {"name": "top", "weight": 3.0}})
    saved = yaml.safe_load((run.path / "config.yaml").read_text())
    assert saved["train"]["objective"] == {"name": "top", "weight": 3.0, "prediction": None}
    problem = BlockProblem.build(run, 2)
    assert isinstance(problem.objective, TopObjective) and problem.objective.weight == 3.0
    assert (problem.objective.t_lo, problem.objective.t_hi) == run.partition.train_range(2)


# ------------------------------------------------------------------ the default, bit for bit
def old_draw(dataset, process, lo, hi, n, device, gen):
    """psm's BlockProblem.draw_batch before objectives, literally."""
    x0 = dataset.sample(n, gen)
    if hi > lo:
        t = torch.empty(n, device=device).uniform_(lo, hi, generator=gen)
    else:
        t = torch.full((n,), lo, device=device)
    noise = torch.randn(x0.shape, generator=gen, device=device)
    x_t, target = process.training_pair(x0, t, noise)
    return x_t, t, target


@pytest.mark.parametrize(
    "sections",
    [
        {},  # VP, ε, intervals
        {"process": {"name": "ot"}},  # flow matching, velocity
        {"partition": {"kind": "grid", "points": 4}},  # DPSM grid points
        {"partition": {"kind": "equal", "blocks": 1}},  # SA-DPM
    ],
)
def test_default_objective_draws_what_psm_drew_before(make_run, sections):
    run = make_run(**sections)
    assert run.config.train.objective == MSESpec()
    for b in range(run.num_blocks):
        problem = BlockProblem.build(run, b)
        assert type(problem.objective) is MSEObjective
        lo, hi = run.partition.train_range(b)
        new, ref = problem.new_generator(), problem.new_generator()
        for _ in range(3):  # consecutive draws: the stream stays in step
            batch = problem.draw_batch(new)
            x_t, t, y = old_draw(run.dataset, run.process, lo, hi, 64, problem.device, ref)
            assert batch.weight is None
            assert torch.equal(batch.x_t, x_t) and torch.equal(batch.t, t)
            assert torch.equal(batch.target, y)
        assert torch.equal(new.get_state(), ref.get_state())


def test_default_objective_is_today_s_training_step(make_run):
    """One StackTrainer step of 3 blocks: the loss is the old ``Process.loss`` of the old
    draws, exactly."""
    run = make_run()
    tr = StackTrainer(run, [0, 1, 2])
    refs = [p.new_generator() for p in tr.problems]
    old = [old_draw(run.dataset, run.process, *run.partition.train_range(b), 64, tr.device, g)
           for b, g in zip(tr.blocks, refs)]  # fmt: skip
    x_t, t, y = (torch.stack([o[i] for o in old]) for i in range(3))
    with torch.no_grad():
        out = tr.stack(x_t, t).float()
    want = torch.mean((out - y) ** 2, dim=(1, 2))
    got = tr.train_step()
    assert torch.equal(got, want)


# ------------------------------------------------------------------ the loss, stacked
@pytest.mark.parametrize("shape", [(5, 64, 2), (3, 8, 1, 4, 4)])
def test_stacked_loss_equals_the_per_block_losses(shape):
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w = torch.rand(shape[:2], generator=g) + 0.5
    obj = MSEObjective(make_process("vp"), 0.1, 0.2)
    dims = tuple(range(1, len(shape)))
    stacked = obj.loss(out, y)
    assert stacked.shape == (shape[0],)
    assert torch.equal(stacked, torch.mean((out - y) ** 2, dim=dims))  # today's Process.loss
    weighted = obj.loss(out, y, w)
    for k in range(shape[0]):
        assert torch.equal(obj.loss(out[k : k + 1], y[k : k + 1])[0], stacked[k])
        assert torch.equal(obj.loss(out[k : k + 1], y[k : k + 1], w[k : k + 1])[0], weighted[k])
        per_sample = ((out[k] - y[k]) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(weighted[k], (w[k] * per_sample).mean())
    assert torch.equal(obj.loss(out, y, torch.ones(shape[:2])), stacked)
    assert torch.equal(obj.loss(out, y, torch.full(shape[:2], 2.0)), 2 * stacked)


def test_stack_batches_adds_a_block_axis():
    g = torch.Generator().manual_seed(1)
    obj = MSEObjective(make_process("vp"), 0.3, 0.6)
    batches = [obj.draw(torch.randn(16, 2, generator=g), g) for _ in range(3)]
    s = stack_batches(batches)
    assert s.x_t.shape == (3, 16, 2) and s.t.shape == (3, 16) and s.weight is None
    assert torch.equal(s.target[1], batches[1].target)
    assert all(((b.t >= 0.3) & (b.t <= 0.6)).all() for b in batches)
    one = stack_batches(batches[:1])
    assert one.x_t.shape == (1, 16, 2) and one.x_t.data_ptr() == batches[0].x_t.data_ptr()
    w = torch.full((16,), 2.0)
    mixed = stack_batches([batches[0], dataclasses.replace(batches[1], weight=w)])
    assert mixed.weight is not None and mixed.weight.shape == (2, 16)
    assert torch.equal(mixed.weight[0], torch.ones(16)) and torch.equal(mixed.weight[1], w)


def test_an_objective_refuses_times_outside_0_1():
    with pytest.raises(ValueError, match="t_lo <= t_hi"):
        MSEObjective(make_process("vp"), 0.5, 0.4)


# ------------------------------------------------------------------ the config
@pytest.mark.parametrize(
    ("objective", "where"),
    [
        ({"name": "nope"}, "train.objective.name: unknown objective 'nope' (choose from"),
        ("mse", "train.objective: expected a mapping"),
        ({"name": "mse", "weight": 2}, "train.objective.weight: Extra inputs are not permitted"),
    ],
)
def test_a_bad_objective_is_a_one_line_config_error(objective, where):
    with pytest.raises(ConfigError) as e:
        validate_config(tiny_config(train={"objective": objective}), "c.yaml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"c.yaml: {where}"), msg


def test_a_bad_objective_on_the_command_line_writes_nothing(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config()))
    out = tmp_path / "out"
    one_line_error(capsys, "train", cfg, "--out", out, "--set", "train.objective.name=nope",
                   "--no-progress", "--no-plot", match="train.objective.name")  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(PINNED_HASHES))
def test_the_default_objective_written_out_keeps_every_shipped_configs_hash(name):
    # the pins themselves: tests/test_executor_registry.py::test_every_config_keeps_its_hash
    cfg = load_config(CONFIGS / name)
    explicit = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"objective": MSESpec()})}
    )
    assert config_hash(explicit) == config_hash(cfg) == PINNED_HASHES[name][0]


def test_a_non_default_objective_changes_the_hash(top):
    base = validate_config(tiny_config())
    same = validate_config(tiny_config(train={"objective": {"name": "mse"}}))
    other = validate_config(tiny_config(train={"objective": {"name": "top"}}))
    heavier = validate_config(tiny_config(train={"objective": {"name": "top", "weight": 2}}))
    assert config_hash(base) == config_hash(same)
    assert len({config_hash(base), config_hash(other), config_hash(heavier)}) == 3
    assert legacy_config_hash(base) is not None and legacy_config_hash(same) is not None
    assert legacy_config_hash(other) is None and legacy_config_hash(heavier) is None
    assert hashed_differences(base, other) == ["train.objective"]
    assert hashed_differences(base, same) == []


def test_the_objective_module_is_pure_maths():
    code = (
        "import sys, psm.core.objective\n"
        "bad = [m for m in sys.modules if m.startswith(('psm.runs', 'psm.training', 'psm.data',"
        " 'psm.viz', 'psm.commands', 'psm.executors', 'matplotlib'))]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
