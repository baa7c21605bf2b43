"""Training blocks: idempotence, exact resume, the ensemble's equivalence, refused checkpoints."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from psm.errors import CheckpointError
from psm.runs.checkpoint import load_weights
from psm.runs.run import Run
from psm.training.stack import stack_nets
from psm.training.train import BlockProblem, train_block, train_ensemble


def weights(run: Run, block: int) -> dict[str, torch.Tensor]:
    return load_file(run.layout.weights(block))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_train_block_is_idempotent(make_run):
    run = make_run()
    out = train_block(run, 1)
    assert out.state == "done" and out.step == 20 and out.last_loss > 0
    before = run.layout.weights(1).read_bytes()
    again = train_block(run.path, 1)
    assert again.state == "skipped"
    assert run.layout.weights(1).read_bytes() == before
    st = run.ledger.status(1)
    assert (st.state, st.step, st.target) == ("done", 20, 20)
    assert run.ledger.status(0).state == "pending"


def test_resume_continues_exactly(make_run, tmp_path):
    straight = make_run(train={"steps": 40})
    train_block(straight, 2)
    resumed = make_run(path=tmp_path / "r", train={"steps": 20})
    train_block(resumed, 2)
    resumed = make_run(path=tmp_path / "r", train={"steps": 40})  # extend the same run
    st = resumed.ledger.status(2)  # done at its own target until it is trained further
    assert (st.state, st.step, st.target) == ("done", 20, 20)
    assert not resumed.ledger.done(2, resumed.config.train.steps)
    assert train_block(resumed, 2).step == 40
    assert max_diff(weights(straight, 2), weights(resumed, 2)) == 0.0
    # metrics are not duplicated by the resume
    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in resumed.layout.metrics(2).read_text().splitlines()]  # fmt: skip
    assert steps == sorted(set(steps))


def test_ensemble_matches_blocks_trained_one_by_one(make_run):
    """Issue 2: 3 blocks as an ensemble for 20 steps == the same 3 blocks one by one, 1e-5."""
    one_by_one, stacked = make_run(), make_run()
    for b in range(3):
        train_block(one_by_one, b)
    outs = train_ensemble(stacked)
    assert [o.state for o in outs] == ["done"] * 3
    for b in range(3):
        assert max_diff(weights(one_by_one, b), weights(stacked, b)) < 1e-5
        a_state = load_file(one_by_one.layout.state(b))
        e_state = load_file(stacked.layout.state(b))
        assert max_diff(a_state, e_state) < 1e-5  # Adam moments and RNG state too


def test_ensemble_resumes_mixed_progress(make_run, tmp_path):
    """Blocks at different steps are stacked by step group and end where one-by-one ends."""
    ref = make_run(train={"steps": 30})
    for b in range(3):
        train_block(ref, b)
    mixed = make_run(path=tmp_path / "m", train={"steps": 10})
    train_block(mixed, 0)  # block 0 at step 10, others fresh
    mixed = make_run(path=tmp_path / "m", train={"steps": 30})
    train_ensemble(mixed)
    for b in range(3):
        assert max_diff(weights(ref, b), weights(mixed, b)) < 1e-5


def test_dpsm_block_trains_at_its_fixed_time(make_run):
    run = make_run(partition={"kind": "grid", "points": 4})
    problem = BlockProblem.build(run, 1)
    t = problem.draw_batch(problem.new_generator()).t
    assert torch.all(t == 0.5)
    assert train_block(run, 1).state == "done"
    net = problem.new_net()
    assert load_weights(run, 1, net) == 20


def test_foreign_checkpoint_is_refused_and_kept(make_run, tmp_path):
    a = make_run()
    train_block(a, 0)
    b = make_run(train={"lr": 5e-4})
    shutil.copy(a.layout.state(0), b.layout.state(0))
    before = b.layout.state(0).read_bytes()
    with pytest.raises(CheckpointError, match="another config"):
        train_block(b, 0)
    assert b.layout.state(0).read_bytes() == before
    assert not b.layout.weights(0).exists()


def test_truncated_checkpoint_is_refused(make_run):
    run = make_run(train={"steps": 10, "checkpoint_every": 5})
    train_block(run, 0)
    data = run.layout.state(0).read_bytes()
    run.layout.state(0).write_bytes(data[: len(data) // 2])
    run.ledger.write(0, state="stopped")  # pretend it was interrupted
    with pytest.raises(CheckpointError, match="unreadable"):
        train_block(run, 0)
    assert len(run.layout.state(0).read_bytes()) == len(data) // 2
    with pytest.raises(CheckpointError, match="unreadable"):
        train_ensemble(run, [0])


def test_weights_must_match_the_net(make_run):
    run = make_run()
    train_block(run, 0)
    assert load_weights(run, 0, BlockProblem.build(run, 0).new_net()) == 20
    other = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match="does not match the configured net"):
        load_weights(run, 0, other)
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(run, 1, other)


def test_time_budget_ends_blocks_and_can_be_raised(make_run, tmp_path):
    run = make_run(train={"steps": 10**9, "max_seconds": 0.3})
    out = train_block(run, 0)
    assert out.state == "done" and 0 < out.step < 10**9
    assert run.ledger.done(0) and run.ledger.status(0).wall_time >= 0.3
    outs = train_ensemble(run, [1, 2])
    assert all(o.state == "done" for o in outs) and run.ledger.done(1) and run.ledger.done(2)
    raised = run.ledger.status(0).wall_time + 0.3  # above what a loaded machine spent already
    more = make_run(path=run.path, train={"steps": 10**9, "max_seconds": raised})
    assert more.ledger.done(0) and not more.ledger.done(0, more.config.train.steps)
    assert train_block(more, 0).step > out.step


def test_stacked_forwards_match_each_net():
    """The MLP's batched-matmul forward and the generic vmap forward give each net's output."""
    from psm.nets import MLPSpec

    torch.manual_seed(0)
    x, t = torch.randn(3, 16, 2), torch.rand(3, 16)
    for time_conditioned in (True, False):
        nets = [MLPSpec().build((2,), time_conditioned=time_conditioned) for _ in range(3)]
        want = torch.stack([n(x[k], t[k]) for k, n in enumerate(nets)])
        got = stack_nets(nets)(x, t)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    class Plain(torch.nn.Module):  # no stacked_forward: the vmap path
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x, t):
            return self.lin(torch.cat([x, t[:, None]], 1))

    nets = [Plain() for _ in range(3)]
    want = torch.stack([n(x[k], t[k]) for k, n in enumerate(nets)])
    torch.testing.assert_close(stack_nets(nets)(x, t), want)


# ---------------------------------------------------------------------- the recipe
def test_learning_rate_schedules():
    from types import SimpleNamespace

    from psm.training.train import Recipe

    def recipe(schedule, warmup=0):
        cfg = SimpleNamespace(lr=1e-3, lr_schedule=schedule, warmup=warmup, ema=None,
                              grad_clip=None, precision="fp32")  # fmt: skip
        return Recipe(cfg, 100, torch.device("cpu"))

    assert [recipe("constant").lr(s) for s in (0, 50, 99)] == [1e-3] * 3
    cos = recipe("cosine")
    assert cos.lr(0) == 1e-3 and cos.lr(50) == pytest.approx(5e-4) and cos.lr(100) < 1e-12
    assert recipe("linear").lr(75) == pytest.approx(2.5e-4)
    warm = recipe("cosine", warmup=10)
    assert warm.lr(0) == pytest.approx(1e-4) and warm.lr(9) == pytest.approx(
        1e-3 * cos.lr(9) / 1e-3
    )


@pytest.mark.parametrize(
    "recipe",
    [{"ema": 0.99}, {"grad_clip": 0.05}, {"lr_schedule": "cosine", "warmup": 5}],
    ids=["ema", "grad_clip", "cosine"],
)
def test_recipes_keep_the_ensemble_equal_to_one_by_one_and_resume_exact(make_run, tmp_path, recipe):
    """EMA, per-block gradient clipping and schedules act block by block: the stack still
    equals one-by-one training, and a resumed block ends where a straight one does."""
    one_by_one, stacked = make_run(train=recipe), make_run(train=recipe)
    for b in range(3):
        train_block(one_by_one, b)
    train_ensemble(stacked)
    for b in range(3):
        assert max_diff(weights(one_by_one, b), weights(stacked, b)) < 1e-5
    half = make_run(path=tmp_path / "h", train={**recipe, "steps": 20, "checkpoint_every": 10})
    straight = make_run(path=tmp_path / "s", train={**recipe, "steps": 20})
    train_block(straight, 1)
    from psm.training.stop import StopRequest
    from psm.training.train import train_stack

    class StopAt(StopRequest):  # stop after 10 steps, as Ctrl-C would
        calls = 0

        def is_set(self) -> bool:
            StopAt.calls += 1
            return StopAt.calls > 10

    assert train_stack(half, [1], StopAt())[0].state == "interrupted"
    train_block(half, 1)
    assert max_diff(weights(straight, 1), weights(half, 1)) == 0.0


def test_ema_weights_are_what_inference_loads(make_run):
    run = make_run(train={"ema": 0.9, "steps": 30})
    train_block(run, 0)
    state = load_file(run.layout.state(0))
    final = weights(run, 0)
    ema = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
    raw = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    assert max_diff(final, ema) == 0.0 and max_diff(final, raw) > 0


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x, t):
        return self.lin(x)


def test_gradient_clipping_is_per_block():
    nets = [_Lin() for _ in range(2)]
    stack = stack_nets(nets)
    x, t = torch.randn(2, 8, 3), torch.rand(2, 8)
    (stack(x, t).pow(2).sum(dim=(1, 2)) * torch.tensor([1.0, 100.0])).sum().backward()
    norms = stack.clip_grad_norm_(1.0)
    after = torch.sqrt(sum(p.grad.pow(2).flatten(1).sum(1) for p in stack.params.values()))
    assert norms[1] > 10 * norms[0]
    torch.testing.assert_close(after, torch.minimum(norms, torch.ones(2)), rtol=1e-4, atol=1e-6)


def test_a_decaying_schedule_ties_blocks_to_their_budget(make_run, tmp_path):
    from psm.errors import RunError

    make_run(path=tmp_path / "r", train={"lr_schedule": "cosine", "steps": 20})
    with pytest.raises(RunError, match=r"train\.steps"):
        make_run(path=tmp_path / "r", train={"lr_schedule": "cosine", "steps": 40})


def test_a_block_trains_alike_in_any_stack_and_big_groups_are_chunked_on_a_cpu(make_run):
    """Issue 21 item 2: a big group is trained as stacks of at most CPU_STACK on a CPU (the
    cache); the stack a block lands in changes its weights and state by float rounding only
    (batched products of another batch count round differently, as between --workers)."""
    from psm.training.train import CPU_STACK, _step_groups, stack_chunks

    sizes = [len(c) for c in stack_chunks(list(range(200)), 16)]
    assert len(sizes) == 13 and set(sizes) == {15, 16}
    assert [b for c in stack_chunks(list(range(200)), 16) for b in c] == list(range(200))
    assert stack_chunks(list(range(5)), None) == [list(range(5))] and stack_chunks([], 4) == []
    big = make_run(partition={"kind": "equal", "blocks": 2 * CPU_STACK + 1})
    sizes = [len(g) for g in _step_groups(big, list(range(2 * CPU_STACK + 1)), None)]
    assert sizes == [11, 11, 11]
    assert [len(g) for g in _step_groups(big, list(range(20)), 7)] == [7, 6, 7]

    whole, pairs = (
        make_run(partition={"kind": "equal", "blocks": 4}),
        make_run(partition={"kind": "equal", "blocks": 4}),
    )
    train_ensemble(whole, max_stack=4)
    train_ensemble(pairs, max_stack=2)
    for b in range(4):
        assert max_diff(weights(whole, b), weights(pairs, b)) < 1e-6
        assert max_diff(load_file(whole.layout.state(b)), load_file(pairs.layout.state(b))) < 1e-6
