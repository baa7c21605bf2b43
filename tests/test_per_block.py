"""Better blocks (issue 19, items 2-3): per-block predictions (ε, x0, v, velocity) and per-block
nets and objectives through ``blocks:``.

The strongest check: blocks that predict x0 or v, read back as ε, give the exact model's field
and its exact likelihood (the true density of a Gaussian mixture), like ε blocks do.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from helpers import one_line_error, tiny_config
from psm.core.likelihood import divergence, log_likelihood
from psm.core.model import BlockModel
from psm.core.ode import SolverSettings
from psm.core.process import PREDICTIONS, make_process
from psm.core.reparam import Reparameterised, as_prediction
from psm.errors import ConfigError
from psm.nets.mlp import PaperMLP
from psm.runs.config import config_hash, validate_config
from psm.runs.inference import evaluate_run, load_model
from psm.runs.run import Run
from psm.training.train import BlockProblem, _step_groups, train_ensemble
from test_likelihood import MIXTURE, UNEVEN7, exact_prior

D64 = torch.float64


def _exact_in(process, prediction):
    """The exact block of MIXTURE, predicting ``prediction`` (built from the exact ε)."""
    eps_process = process.with_prediction("epsilon")
    eps_block = MIXTURE.block(eps_process)
    source = process.with_prediction(prediction)

    def block(x, t):
        return source.from_epsilon(eps_block(x, t), x, t)

    return block, source


@pytest.mark.parametrize("name", ["vp", "ot"])
def test_every_prediction_read_back_gives_the_exact_field_and_density(name):
    process = make_process(name, prediction="epsilon")
    x = MIXTURE.sample(16, torch.Generator().manual_seed(1)).to(D64)
    t = torch.rand(16, dtype=D64, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    want = process.velocity(MIXTURE.block(process)(x, t), x, t)
    blocks = []
    for i in range(UNEVEN7.num_blocks):
        pred = PREDICTIONS[i % len(PREDICTIONS)]
        raw, source = _exact_in(process, pred)
        # the raw output is what a net predicting `pred` would give; read as ε for the model
        blocks.append(as_prediction(_Fn(raw), source, process))
        got = process.velocity(blocks[-1](x, t), x, t)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    model = BlockModel(process, UNEVEN7, blocks)
    kw = dict(solver=SolverSettings("rk4", 60), prior_log_prob=exact_prior(MIXTURE, process))
    x0 = MIXTURE.sample(6, torch.Generator().manual_seed(3))
    mixed = log_likelihood(model, x0, trace="exact", **kw)
    truth = MIXTURE.log_prob(process, x0, UNEVEN7.t0)
    torch.testing.assert_close(mixed, truth, rtol=0, atol=2e-4)


class _Fn(torch.nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x, t):
        return self.fn(x, t)


@pytest.mark.parametrize("pred", ["x0", "v", "velocity"])
def test_the_one_pass_trace_of_a_reparameterised_mlp_is_autograds(pred):
    torch.manual_seed(0)
    process = make_process("vp")
    net = PaperMLP(2, [8, 8]).double().eval()
    wrapped = Reparameterised(net, process.with_prediction(pred), process)
    x = torch.randn(10, 2, dtype=D64)
    t = torch.rand(10, dtype=D64) * 0.5 + 0.01
    out, tr = wrapped.output_and_trace(x, t)
    torch.testing.assert_close(out, wrapped(x, t))
    _, want = divergence(lambda y: wrapped(y, t), x)
    torch.testing.assert_close(tr, want)


def test_fourier_mlp_stacks_and_has_no_closed_form_trace():
    a, b = PaperMLP(2, [8], fourier=6, fourier_scale=2.0), PaperMLP(2, [8], fourier=6)
    assert a.layers[0].in_features == 2 + 12 + 2
    torch.testing.assert_close(a.fourier_freqs / 2.0, b.fourier_freqs)  # one fixed B
    assert "fourier_freqs" in a.state_dict()
    x, t = torch.randn(5, 2), torch.rand(5)
    assert a.eval().output_and_trace(x, t) is None
    params = {n: torch.stack([p, p + 0.1]) for n, p in a.named_parameters()}
    two = a.stacked_forward(params, torch.stack([x, x]), torch.stack([t, t]))
    torch.testing.assert_close(two[0], a(x, t))


# ---------------------------------------------------------------------- config
def _blocks_config(entries, **sections):
    return validate_config(tiny_config(blocks=entries, **sections))


def test_block_overrides_merge_onto_the_run_and_move_the_hash_only_when_given():
    plain = validate_config(tiny_config())
    cfg = _blocks_config([
        {"first": 0, "net": {"hidden": [32, 32], "fourier": 4}, "objective": {"prediction": "x0"}},
        {"first": 1, "last": 2, "objective": {"prediction": "v"}},
    ])  # fmt: skip
    assert cfg.net_for(0).hidden == [32, 32] and cfg.net_for(0).fourier == 4
    assert cfg.net_for(0).activation == plain.net.activation  # merged, not replaced
    assert cfg.net_for(1) == plain.net and cfg.net_for(None) == plain.net
    assert [cfg.objective_for(b).prediction for b in range(3)] == ["x0", "v", "v"]
    assert config_hash(validate_config(tiny_config(blocks=[]))) == config_hash(plain)
    assert config_hash(cfg) != config_hash(plain)
    assert cfg.net_key(1) == cfg.net_key(2) != cfg.net_key(0)
    one = [{"first": 0, "net": {"fourier": 4, "fourier_scale": 2}}]
    same = [{"first": 0, "last": 0, "net": {"fourier": 4, "fourier_scale": 2.0}}]
    other = [{"first": 0, "net": {"fourier": 4, "fourier_scale": 2.5}}]
    hashes = [config_hash(_blocks_config(e)) for e in (one, same, other)]
    assert hashes[0] == hashes[1] != hashes[2]


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([{"first": 3, "net": {"hidden": [4]}}], "partition has 3"),
        ([{"first": 0, "last": 1, "net": {"hidden": [4]}}, {"first": 1, "objective": {}}],
         "both set block 1"),
        ([{"first": 0, "net": {"hidden": [0]}}], "blocks[0].net"),
        ([{"first": 0, "objective": {"prediction": "x1"}}], "blocks[0].objective"),
        ([{"first": 0}], "needs net: or objective:"),
        ([{"first": 2, "last": 1, "net": {}}], "below first"),
    ],
)  # fmt: skip
def test_bad_block_overrides_are_one_line_errors(entries, match):
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace("]", r"\]")) as e:
        _blocks_config(entries)
    assert "\n" not in str(e.value).strip()


# ---------------------------------------------------------------------- training and reading
def test_a_run_with_per_block_nets_and_predictions_trains_loads_and_exports(make_run, tmp_path):
    run = make_run(
        blocks=[
            {"first": 0, "net": {"hidden": [24, 24]}, "objective": {"prediction": "x0"}},
            {"first": 2, "objective": {"prediction": "v"}},
        ],
        train={"heldout_every": 10, "heldout_points": 64},
    )
    assert sorted(_step_groups(run, [0, 1, 2], None)) == [[0], [1, 2]]  # a stack per net
    problems = [BlockProblem.build(run, b) for b in range(3)]
    assert [p.objective.process.prediction for p in problems] == ["x0", "epsilon", "v"]
    assert [o.state for o in train_ensemble(run)] == ["done"] * 3
    with safe_open(str(run.layout.weights(0)), framework="pt") as f:
        assert f.get_tensor("layers.0.weight").shape[0] == 24
        assert json.loads(json.dumps(f.metadata()))["net"] == "mlp"
    with safe_open(str(run.layout.weights(1)), framework="pt") as f:
        assert f.get_tensor("layers.0.weight").shape[0] == 16
    status = run.ledger.status(0)
    assert status.state == "done"
    model = load_model(run.path)
    assert isinstance(model.blocks[0], Reparameterised) and isinstance(
        model.blocks[2], Reparameterised
    )
    assert not isinstance(model.blocks[1], Reparameterised)
    res = evaluate_run(run.path, n=32, solver=SolverSettings("rk4", 8))
    assert torch.isfinite(torch.as_tensor(res.result.nll))
    from psm.api import export, load

    out = tmp_path / "m.safetensors"
    export(run.path, out)
    x = torch.randn(7, 2)
    torch.testing.assert_close(load(out).log_prob(x), load(run.path).log_prob(x))


def test_a_warm_start_between_predictions_is_refused(make_run, tmp_path, capsys):
    src = make_run(path=tmp_path / "src")
    assert [o.state for o in train_ensemble(src)] == ["done"] * 3
    cfg = tmp_path / "warm.yaml"
    import yaml

    raw = tiny_config(blocks=[{"first": 1, "objective": {"prediction": "x0"}}])
    raw["train"] = {**raw["train"], "init_from": str(src.path)}
    cfg.write_text(yaml.safe_dump(raw))
    one_line_error(capsys, "train", cfg, "--out", tmp_path / "warm", match="predicts x0")
    assert not (tmp_path / "warm").exists()


def test_loading_the_wrong_net_for_a_block_is_refused(make_run):
    run = make_run(blocks=[{"first": 0, "net": {"hidden": [24, 24]}}])
    assert [o.state for o in train_ensemble(run)] == ["done"] * 3
    from psm.errors import PSMError
    from psm.runs.checkpoint import load_weights

    with pytest.raises(PSMError):
        load_weights(run, 0, run.parts.new_net(1))  # block 1's shape for block 0's file
    assert Run.open(run.path).parts.new_net(0).layers[0].out_features == 24


# ---------------------------------------------------------------------- commands
def test_kl_of_chosen_blocks_beside_the_zero_net(make_run, capsys):
    from helpers import run_cli

    runs = [
        make_run(blocks=[{"first": 0, "objective": {"prediction": p}}]) for p in ("x0", "score")
    ]
    for run in runs:
        assert [o.state for o in train_ensemble(run, [0])] == ["done"]
    rows = []
    for run in runs:
        code, out, _ = run_cli(capsys, "kl", run.path, "--blocks", "0", "--zero", "--points",
                               "64", "--times", "4", "--json")  # fmt: skip
        assert code == 0
        rows.append(json.loads(out)["blocks"])
    assert [len(r) for r in rows] == [1, 1] and rows[0][0]["block"] == 0
    assert rows[0][0]["zero_net"] == rows[1][0]["zero_net"] > 0  # the same points, any model
    assert rows[0][0]["kl"] != rows[1][0]["kl"]
    one_line_error(capsys, "kl", runs[0].path, match="not fully trained")
    one_line_error(capsys, "kl", runs[0].path, "--blocks", "1", match="block(s) 1 not done")
    one_line_error(capsys, "kl", runs[0].path, "--blocks", "7", match="blocks 0-2")
    one_line_error(capsys, "kl", runs[0].path, "--zero", "--estimate", match="--zero needs")


def test_dry_run_prints_each_nets_parameters_and_flops(tmp_path, capsys):
    import yaml

    from helpers import run_cli
    from psm.runs.run_parts import Parts

    raw = tiny_config(blocks=[{"first": 2, "net": {"hidden": [40]}}])
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    code, out, _ = run_cli(capsys, "train", cfg_path, "--out", tmp_path / "r", "--dry-run")
    assert code == 0 and not (tmp_path / "r").exists()
    parts = Parts(validate_config(raw))
    small = sum(p.numel() for p in parts.new_net(0).parameters())
    big = sum(p.numel() for p in parts.new_net(2).parameters())
    assert f"block(s) 0-1: mlp, {small} parameters" in out
    assert f"block(s) 2: mlp, {big} parameters" in out
    # forward FLOPs of an MLP: 2 x (multiply-adds of its weight matrices), per sample
    flops = 2 * (4 * 40 + 40 * 2)
    assert f"{flops} FLOPs per sample forward" in out


def test_a_log_time_mlp_is_fed_log_t_in_every_path():
    torch.manual_seed(1)
    a = PaperMLP(2, [8, 8], time_input="log").double().eval()
    b = PaperMLP(2, [8, 8]).double().eval()
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(6, 2, dtype=D64), torch.rand(6, dtype=D64) * 1e-3 + 1e-4
    torch.testing.assert_close(a(x, t), b(x, t.log()))
    out, tr = a.output_and_trace(x, t)
    torch.testing.assert_close(out, a(x, t))
    torch.testing.assert_close(tr, divergence(lambda y: a(y, t), x)[1])
    params = {n: p[None] for n, p in a.named_parameters()}
    torch.testing.assert_close(a.stacked_forward(params, x[None], t[None])[0], a(x, t))
