"""Per-block step targets (``train.block_steps``): a fixed total given unevenly to the blocks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers import one_line_error, tiny_config
from psm.runs.config import ConfigError, config_hash, load_config, validate_config
from psm.runs.inference import load_model
from psm.training.train import train_block, train_ensemble


def weights(run, block: int) -> dict[str, torch.Tensor]:
    return load_file(run.layout.weights(block))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_each_block_trains_to_its_own_target_exactly_as_alone(make_run, schedule):
    """A block with target n ends with the very weights of the same block trained alone in a
    run whose ``train.steps`` is n: its batches, its Adam state and (cosine) its schedule's
    horizon are its own. Blocks with different targets stack apart; all are done."""
    recipe = {"lr_schedule": schedule, "warmup": 3 if schedule == "cosine" else 0}
    uneven = make_run(train={**recipe, "block_steps": [30, 10, 20]})
    outs = train_ensemble(uneven)
    assert [o.state for o in outs] == ["done"] * 3
    assert [uneven.ledger.read(b)["step"] for b in range(3)] == [30, 10, 20]
    assert [uneven.ledger.read(b)["target"] for b in range(3)] == [30, 10, 20]
    assert (
        uneven.ledger.not_done(invocation=True) == []
        and sum(map(uneven.config.step_target, range(3))) == 60
    )
    for b, n in enumerate([30, 10, 20]):
        alone = make_run(train={**recipe, "steps": n})
        train_block(alone, b)
        assert same(weights(uneven, b), weights(alone, b)), f"block {b}"
    model = load_model(uneven)  # inference takes blocks done at different counts
    assert len(model.blocks) == 3


def test_block_steps_must_match_the_partition():
    with pytest.raises(ConfigError, match="3 blocks"):
        validate_config(tiny_config(train={"block_steps": [10, 10]}))
    with pytest.raises(ConfigError, match="block_steps"):
        validate_config(tiny_config(train={"block_steps": [10, 0, 10]}))


def test_block_steps_count_in_the_hash_only_with_a_decaying_schedule():
    def h(**train):
        return config_hash(validate_config(tiny_config(train=train)))

    # constant rate: targets are not part of the problem (a longer target extends the block)
    assert h(block_steps=[10, 20, 30]) == h(block_steps=[10, 20, 40]) == h(steps=99)
    cos = {"lr_schedule": "cosine"}
    assert h(**cos, block_steps=[10, 20, 30]) != h(**cos, block_steps=[10, 20, 40])
    assert h(**cos, block_steps=[10, 20, 30]) != h(**cos, steps=10)


def test_steps_flag_is_refused_when_blocks_have_their_own_targets(tmp_path, capsys):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(train={"block_steps": [5, 5, 10]})))
    with pytest.raises(ConfigError, match="block_steps"):
        load_config(cfg, steps=50)
    out = tmp_path / "r"
    one_line_error(capsys, "train", cfg, "--steps", "50", "--out", out, match="block_steps")
    assert not out.exists()


def test_cli_trains_each_block_to_its_target(tmp_path, capsys):
    import yaml

    from helpers import run_cli
    from psm.runs.run import Run

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(train={"block_steps": [15, 5, 10]})))
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "train", cfg, "--out", out, "--no-progress", "--no-plot")
    assert code == 0, err
    assert "steps per block 15, 5, 10" in err
    run = Run.open(out)
    assert [run.ledger.read(b)["step"] for b in range(3)] == [15, 5, 10]
    code, out_text, _ = run_cli(capsys, "train", cfg, "--out", out, "--dry-run")
    assert code == 0
    rows = [line.split() for line in out_text.splitlines() if line.strip()[:1].isdigit()]
    assert [r[-3] for r in rows] == ["15", "5", "10"]


def test_worker_shares_balance_the_step_targets():
    from psm.executors.base import balanced_shares

    # equal targets: the interleaved split the ensemble executor always made
    assert balanced_shares([0, 1, 2, 3, 4], [5] * 5, 2) == [[0, 2, 4], [1, 3]]
    assert balanced_shares([3, 5, 9], [1, 1, 1], 4) == [[3], [5], [9]]
    # uneven targets: equal work per worker, not equal block counts
    shares = balanced_shares([0, 1, 2, 3, 4], [420, 430, 430, 340, 100], 2)
    loads = {0: 420, 1: 430, 2: 430, 3: 340, 4: 100}
    totals = sorted(sum(loads[b] for b in s) for s in shares)
    assert totals == [850, 870] and sorted(b for s in shares for b in s) == [0, 1, 2, 3, 4]


def test_two_ensemble_workers_train_uneven_targets(make_run):
    from psm.executors.ensemble import EnsembleExecutor

    run = make_run(train={"block_steps": [12, 4, 8]})
    outs = EnsembleExecutor(workers=2, threads=1).run(run, [0, 1, 2])
    assert sorted(o.block for o in outs) == [0, 1, 2]
    assert all(o.state == "done" for o in outs)
    assert [run.ledger.read(b)["step"] for b in range(3)] == [12, 4, 8]
