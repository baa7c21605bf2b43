"""Configs: the shipped YAML files, overrides, hashing, and field-naming errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import tiny_config
from psm.errors import ConfigError
from psm.runs.config import config_hash, hashed_differences, load_config, validate_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "toy").glob("*.yaml"))
DATA, METHODS = ("ty", "hg"), ("sa", "sa_authors", "tpsm_a", "tpsm_b", "tpsm10", "tpsm_c",
                                "dpsm", "fm_sa", "fm_tpsm10")  # fmt: skip


def test_every_paper_2d_experiment_has_a_config():
    names = {p.stem for p in CONFIGS}
    assert names == {f"{d}_{m}" for d in DATA for m in METHODS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_hold_paper_settings(path):
    cfg = load_config(path)
    assert cfg.train.batch_size == 512 and cfg.train.lr == 1e-3
    assert cfg.net.name == "mlp" and cfg.net.hidden == [100, 150, 100]
    method = path.stem.split("_", 1)[1]
    authors = method == "sa_authors"  # the authors' SA script: b = 12 t, t0 = 0.01, 299 steps
    assert cfg.net.activation == "elu" and cfg.partition.t0 == (0.01 if authors else 1e-4)
    assert cfg.eval.steps == (299 if authors else 1000)
    k = cfg.partition.build().num_blocks
    expected = {"sa": 1, "sa_authors": 1, "tpsm_a": 2, "tpsm_b": 4, "tpsm10": 10, "tpsm_c": 200,
                "dpsm": 100, "fm_sa": 1, "fm_tpsm10": 10}[method]  # fmt: skip
    assert k == expected
    if method != "dpsm":  # the authors' step counts: SA 2,000,000, every TPSM block 500,000
        assert cfg.train.steps == (2_000_000 if k == 1 else 500_000)
    assert cfg.process.name == ("ot" if method.startswith("fm") else "vp")
    if cfg.process.name == "vp":
        assert (cfg.process.b_min, cfg.process.b_max) == (0.0, 12.0 if authors else 10.0)


def test_paper_splits():
    assert load_config(CONFIGS[0].with_name("ty_tpsm_a.yaml")).partition.build().edges == (
        0,
        0.1,
        1,
    )
    b = load_config(CONFIGS[0].with_name("hg_tpsm_b.yaml")).partition.build()
    assert b.edges == (0, 0.02, 0.1, 0.3, 1)


def test_overrides(tmp_path):
    path = CONFIGS[0].with_name("ty_tpsm10.yaml")
    cfg = load_config(
        path, overrides=["train.lr=2e-4", "partition.blocks=5", "net.hidden=[8, 8]"],
        steps=77, out=str(tmp_path / "x"), seed=3,
    )  # fmt: skip
    assert cfg.train.lr == 2e-4 and cfg.train.steps == 77 and cfg.train.seed == 3
    assert cfg.partition.build().num_blocks == 5 and cfg.net.hidden == [8, 8]
    assert cfg.out_dir == tmp_path / "x"


def test_a_runs_own_config_file_is_a_config_with_the_same_hash(tmp_path):
    from psm.runs.run import Run

    run = Run.create(load_config(CONFIGS[0].with_name("ty_tpsm10.yaml"), out=str(tmp_path / "a")))
    again = load_config(run.path / "config.yaml", out=str(tmp_path / "b"))
    assert config_hash(again) == run.hash and again.out_dir == tmp_path / "b"


def test_hash_ignores_steps_and_executor_but_not_problem():
    a = validate_config(tiny_config())
    b = validate_config(tiny_config(train={"steps": 999, "log_every": 7}, executor={"workers": 4}))
    c = validate_config(tiny_config(train={"lr": 5e-4}))
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(c)
    assert hashed_differences(a, c) == ["train.lr"]


@pytest.mark.parametrize(
    "sections, match",
    [
        ({"data": {"name": "swirl"}}, r"data\.name: unknown dataset 'swirl'"),
        ({"net": {"name": "resnet"}}, r"net\.name: unknown net 'resnet'"),
        ({"process": {"name": "ve"}}, r"process\.name: unknown process 've' \(choose from ot"),
        ({"train": {"lr": "fast"}}, r"train\.lr: Input should be a valid number"),
        ({"train": {"steps": 2.5}}, r"train\.steps"),
        ({"train": {"stepz": 5}}, r"train\.stepz: Extra inputs are not permitted"),
        ({"partition": {"kind": "splits", "splits": [0, 0.5, 0.2, 1]}}, "strictly increasing"),
        ({"partition": {"kind": "splits", "splits": [0, 0.5, 2]}}, r"in \[0, 1\]"),
        ({"partition": {"kind": "equal", "blocks": 0}}, ">= 1"),
        ({"partition": {"kind": "grid"}}, "points is required"),
    ],
)
def test_bad_fields_are_named(sections, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(tiny_config(**sections))


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: malformed YAML at line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match=r"expected section\.field=value"):
        load_config(CONFIGS[0], overrides=["train.lr"])
