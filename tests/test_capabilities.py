"""Declared capabilities instead of duck typing: the data protocols (exact density, levels, pixel
map), the nets' stacking members, the eval section's one solver conversion, progress reported by
a core that imports no UI, and what the SDE sampler takes of a solver."""

from __future__ import annotations

import ast
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn

from helpers import one_line_error, run_cli, tiny_config
from psm.core.ode import SolverSettings, solve_units, steps_for
from psm.core.partition import equal
from psm.core.process import make_process
from psm.core.progress import Progress
from psm.core.sample import sample, sample_path
from psm.data import DATASETS, TOYS, Dataset, DataSpec, ExactDensity, Mixture, PixelMap, Quantized
from psm.data.base import DataError
from psm.data.images import ImageDataset
from psm.nets import NETS, BlockNet, ClassicUNet, DDPMUNet, PaperMLP, StackedForward, is_stackable
from psm.runs.config import EvalConfig, config_hash, validate_config
from psm.runs.run import Run
from test_likelihood import GAUSS, MIXTURE, exact_model

SRC = Path(__file__).parents[1] / "src" / "psm"
UPPER = ("runs", "training", "executors", "auto", "experiments", "commands", "viz", "bench")
UI = ("tqdm", "rich", "matplotlib")


# ------------------------------------------------------------------ data capabilities
@pytest.mark.parametrize("name", sorted(TOYS))
def test_toy_data_claim_an_exact_density_exactly_when_they_have_one(name):
    ds = DATASETS.validate({"name": name}).build(seed=0)
    assert isinstance(ds, Dataset)
    assert isinstance(ds, ExactDensity) == isinstance(ds, Mixture)
    assert not isinstance(ds, Quantized) and not isinstance(ds, PixelMap)
    if isinstance(ds, ExactDensity):
        x = ds.sample(50, torch.Generator().manual_seed(0)).double()
        lp = ds.marginal_log_prob(x, 0.9, 0.3)
        assert lp.shape == (50,) and torch.isfinite(lp).all()
        assert ds.marginal_score(x, 0.9, 0.3).shape == (50, 2)


def test_the_paper_sets_are_exact_densities():
    for name in ("ty", "hg", "8gaussians", "checkerboard"):
        assert isinstance(DATASETS.validate({"name": name}).build(seed=0), ExactDensity), name


def test_images_have_levels_and_a_map_back_to_pixels():
    ds = DATASETS.validate({"name": "digits"}).build(seed=0)
    assert isinstance(ds, ImageDataset)
    assert isinstance(ds, Quantized) and isinstance(ds, PixelMap)
    assert not isinstance(ds, ExactDensity)
    want = -ds.log_scale_per_dim / math.log(2) + math.log2(ds.levels)
    assert ds.bits_per_dim(0.0) == pytest.approx(want)


def test_points_files_claim_no_capability(tmp_path):
    import numpy as np

    path = tmp_path / "p.npy"
    np.save(path, np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32))
    ds = DATASETS.validate({"name": "points", "path": str(path)}).build(seed=0)
    assert not isinstance(ds, (ExactDensity, Quantized, PixelMap))


def test_one_test_set_signature_for_every_dataset(tmp_path):
    """``test_set(n, seed, dequantize)`` everywhere; ``dequantize`` only where there are levels."""
    import numpy as np

    from psm.data.classic import NoisyCurves, Pinwheel, Rings
    from psm.data.points import PointsDataset

    want = list(inspect.signature(Dataset.test_set).parameters)
    assert want == ["self", "n", "seed", "dequantize"]
    for cls in (Dataset, Mixture, Rings, NoisyCurves, Pinwheel, PointsDataset, ImageDataset):
        assert list(inspect.signature(cls.test_set).parameters) == want, cls.__name__
    ty = TOYS["ty"]()
    torch.testing.assert_close(ty.test_set(5, 3, None), ty.test_set(5, 3))
    with pytest.raises(DataError, match="no levels to dequantize"):
        ty.test_set(5, 3, dequantize=False)
    path = tmp_path / "p.npy"
    np.save(path, np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32))
    points = DATASETS.validate({"name": "points", "path": str(path)}).build(seed=0)
    with pytest.raises(DataError, match="no levels to dequantize"):
        points.test_set(5, dequantize=True)
    digits = ImageDataset.digits()
    assert not torch.equal(digits.test_set(4, 1, True), digits.test_set(4, 1, False))


def test_evaluation_reads_bits_per_dim_off_the_protocol():
    from psm.runs.inference import is_image_data

    assert is_image_data(ImageDataset.digits()) and not is_image_data(TOYS["ty"]())


# ------------------------------------------------------------------ net capabilities
def test_every_registered_net_is_a_block_net_that_declares_stacking():
    shapes = {"mlp": (2,), "ddpm_unet": (1, 8, 8), "classic_unet": (1, 8, 8)}
    small = {
        "ddpm_unet": {"base": 8, "mults": [1, 2], "res_blocks": 1, "groups": 4},
        "classic_unet": {"base": 4, "depth": 1, "groups": 2},
    }
    for name in NETS.names():
        spec = NETS.validate({"name": name, **small.get(name, {})})
        net = spec.build(shapes[name], time_conditioned=name != "classic_unet")
        assert isinstance(net, BlockNet) and isinstance(net.stackable, bool), name


def test_the_mlp_declares_stackable_and_a_stacked_forward():
    net = PaperMLP(2)
    assert net.stackable and is_stackable(net) and isinstance(net, StackedForward)


def test_the_unets_stack_through_vmap_and_batch_norm_not_at_all():
    ddpm = DDPMUNet(channels=1, base=8, mults=(1, 2), res_blocks=1, groups=4)
    assert is_stackable(ddpm) and not isinstance(ddpm, StackedForward)
    group = ClassicUNet(channels=1, base=4, depth=1, groups=2)
    batch = ClassicUNet(channels=1, base=4, depth=1, groups=2, norm="batch")
    assert is_stackable(group) and not isinstance(group, StackedForward)
    assert batch.stackable is False and not is_stackable(batch)
    assert ClassicUNet.stackable  # the instance's value stays on the instance


def test_a_plain_module_declares_nothing_and_is_stacked_through_vmap():
    plain = nn.Linear(2, 2)
    assert is_stackable(plain) and not isinstance(plain, StackedForward)


def test_a_batch_norm_stack_is_refused_in_one_line():
    from psm.errors import RunError
    from psm.training.stack import stack_nets

    nets = [ClassicUNet(channels=1, base=4, depth=1, groups=2, norm="batch") for _ in range(2)]
    with pytest.raises(RunError, match="cannot be stacked") as e:
        stack_nets(nets)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ commands refuse in one line
class FlatImages(Dataset):
    """Image-shaped noise with neither levels nor a map back to pixels."""

    name = "flat_images"
    shape = (1, 4, 4)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((n, *self.shape), generator=generator, device=generator.device)


class FlatImagesSpec(DataSpec):
    name: Literal["flat_images"] = "flat_images"

    def build(self, *, seed: int) -> Dataset:
        return FlatImages()


@pytest.fixture
def flat_run(tmp_path):
    DATASETS.register(FlatImagesSpec)
    raw = tiny_config(data={"name": "flat_images"})
    raw["net"] = {"name": "classic_unet", "base": 4, "depth": 1, "groups": 2}
    run = Run.create(validate_config(raw), tmp_path / "flat")
    yield run
    DATASETS.unregister(FlatImagesSpec)


def test_commands_refuse_data_without_the_capability_they_need(flat_run, tmp_path, capsys):
    assert not isinstance(flat_run.dataset, (ExactDensity, Quantized, PixelMap))
    one_line_error(capsys, "sample", flat_run.path, "--out", tmp_path / "s.png",
                   match="have no map back to pixels")  # fmt: skip
    one_line_error(capsys, "plot", flat_run.path, match="have no map back to pixels")
    # psm kl needs no capability: without an exact density it estimates (up to a constant)
    one_line_error(capsys, "kl", flat_run.path, match="not fully trained")
    one_line_error(capsys, "nll", flat_run.path, "--convention", "authors",
                   match="the authors' convention is for image data")  # fmt: skip


# ------------------------------------------------------------------ eval → SolverSettings
@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"solver": "euler", "steps": 37},
        {"solver": "dopri5", "rtol": 1e-7, "atol": 3e-8},
        {"solver": "rk4", "steps": 5, "rtol": 2e-3, "atol": 4e-3},
    ],
)
def test_eval_yields_its_solver_settings_in_one_conversion(fields):
    ev = EvalConfig(**fields)
    s = ev.solver_settings()
    assert isinstance(s, SolverSettings)
    assert (s.method, s.steps, s.rtol, s.atol) == (ev.solver, ev.steps, ev.rtol, ev.atol)
    assert EvalConfig(**json.loads(json.dumps(ev.model_dump()))).solver_settings() == s


def test_eval_defaults_are_the_solver_defaults_and_stay_out_of_the_hash():
    from psm.commands.model_flags import DEFAULT_TOL

    assert EvalConfig().solver_settings() == SolverSettings()
    assert DEFAULT_TOL == SolverSettings.rtol == SolverSettings.atol
    base = validate_config(tiny_config())
    other = validate_config(tiny_config(eval={"solver": "dopri5", "rtol": 1e-3, "atol": 1e-4}))
    assert config_hash(base) == config_hash(other)
    with pytest.raises(Exception, match="rtol"):
        validate_config(tiny_config(eval={"rtol": 0}))


def test_flags_override_the_runs_solver_field_by_field():
    import argparse

    from psm.commands.model_flags import ode_settings

    run_solver = EvalConfig(solver="dopri5", rtol=1e-6, atol=2e-6).solver_settings()

    def flags(**kw):
        return argparse.Namespace(**{"solver": None, "steps": None, "rtol": None, "atol": None,
                                     **kw})  # fmt: skip

    assert ode_settings(flags(), run_solver, blocks=3) == run_solver
    assert ode_settings(flags(atol=1e-9), run_solver, blocks=3) == SolverSettings(
        "dopri5", 1000, 1e-6, 1e-9
    )
    assert ode_settings(flags(solver="rk4", steps=(1, 2, 3)), run_solver, blocks=3) == (
        SolverSettings("rk4", (1, 2, 3), 1e-6, 2e-6)
    )


def test_an_nll_record_gives_back_its_solver():
    from psm.commands.nll import record_solver

    for s in (SolverSettings("rk4", 20), SolverSettings("rk4", (3, 4)),
              SolverSettings("dopri5", rtol=1e-7, atol=2e-7)):  # fmt: skip
        adaptive = not s.fixed_step
        steps = None if adaptive else (s.steps if isinstance(s.steps, int) else list(s.steps))
        rec = {"solver": s.method, "steps": steps, "rtol": s.rtol if adaptive else None,
               "atol": s.atol if adaptive else None}  # fmt: skip
        back = record_solver(json.loads(json.dumps(rec)))
        assert back.describe() == s.describe()
        if adaptive:
            assert back == s


# ------------------------------------------------------------------ the core imports no UI
def test_the_core_imports_no_ui_and_no_upper_layer():
    """Every psm.core module, imported in a fresh interpreter, loads no module of the layers
    above and no UI library beyond what torch itself loads (torch.hub imports tqdm)."""
    code = (
        "import sys, importlib, pkgutil, torch, numpy, pydantic\n"
        "base = set(sys.modules)\n"
        "import psm.core\n"
        "for m in pkgutil.walk_packages(psm.core.__path__, 'psm.core.'):\n"
        "    importlib.import_module(m.name)\n"
        f"upper = {tuple('psm.' + u for u in UPPER)!r}\n"
        f"ui = {UI!r}\n"
        "bad = [m for m in sys.modules if m.startswith(upper) or\n"
        "       (m.split('.')[0] in ui and m not in base)]\n"
        "print(','.join(sorted(bad)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_core_module_names_a_ui_library_or_an_upper_layer():
    """The same, read off the source: no import of tqdm, rich, matplotlib or ``psm.<upper>``."""
    for path in sorted((SRC / "core").rglob("*.py")):
        package = ["psm", *path.parent.relative_to(SRC).parts]  # psm.core[.sub]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                names = [".".join([*base, node.module or ""])]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in UI, (path.name, name)
                assert not name.startswith(tuple(f"psm.{u}" for u in UPPER)), (path.name, name)


# ------------------------------------------------------------------ progress callbacks
class Recorder:
    """A :class:`Progress` that writes down what it is told."""

    def __init__(self) -> None:
        self.totals: list[int] = []
        self.notes: list[str] = []
        self.steps = 0

    def start(self, total: int) -> None:
        self.totals.append(total)

    def advance(self, n: int = 1) -> None:
        self.steps += n

    def note(self, text: str) -> None:
        self.notes.append(text)


@pytest.mark.parametrize("method", ["ode", "sde"])
def test_samplers_report_every_step_and_batch_and_draw_the_same(method):
    model = exact_model(GAUSS, make_process("vp"), equal(3), shape=(2,))
    solver = SolverSettings("rk4", 12)
    rec = Recorder()
    assert isinstance(rec, Progress)
    kw = dict(method=method, solver=solver, batch_size=4, dtype=torch.float64)
    x = sample(model, 10, generator=torch.Generator().manual_seed(1), progress=rec, **kw)
    quiet = sample(model, 10, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(x, quiet)
    per_batch = (
        solve_units(model.segments(), solver)
        if method == "ode"
        else sum(steps_for(model.segments(), solver.steps))
    )
    assert rec.totals == [3 * per_batch] and rec.steps == 3 * per_batch
    assert rec.notes == ["batch 1/3", "batch 2/3", "batch 3/3"]


def test_the_nll_reports_every_step_and_gives_the_same_values():
    from psm.core.likelihood import evaluate_nll

    model = exact_model(MIXTURE, make_process("vp"), equal(2))
    x = MIXTURE.sample(9, torch.Generator().manual_seed(6))
    solver = SolverSettings("rk4", 10)
    rec = Recorder()
    res = evaluate_nll(model, x, batch_size=5, solver=solver, progress=rec)
    quiet = evaluate_nll(model, x, batch_size=5, solver=solver)
    assert torch.equal(res.values, quiet.values)
    assert rec.totals == [2 * solve_units(model.segments(), solver)] == [rec.steps]
    assert rec.notes == ["batch 1/2", "batch 2/2"]


def test_the_core_draws_no_bar_itself():
    model = exact_model(GAUSS, make_process("vp"), equal(2), shape=(2,))
    with pytest.raises(TypeError, match=r"psm\.progress\.progress_bar"):
        sample(model, 2, generator=torch.Generator(), progress=True)
    sample(model, 2, generator=torch.Generator(), solver=SolverSettings("rk4", 4), progress=False)


def test_the_tqdm_bar_keeps_its_label_unit_and_batch_note(monkeypatch):
    import tqdm.auto

    made: list[tqdm.auto.tqdm] = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr("psm.progress.tqdm", Bar)
    monkeypatch.setenv("PSM_PROGRESS", "bar")  # tqdm even though pytest's stderr is no terminal
    from psm.progress import progress_bar

    model = exact_model(GAUSS, make_process("vp"), equal(2), shape=(2,))
    solver = SolverSettings("rk4", 8)
    with progress_bar("sample (ode)") as bar:
        sample(model, 6, generator=torch.Generator(), solver=solver, batch_size=4, progress=bar)
        (b,) = made
        assert (b.desc, b.unit, b.total, b.n) == ("sample (ode)", "step", 16, 16)
        assert b.postfix == "batch 2/2" and not b.leave
    with progress_bar("NLL", enabled=False) as bar:
        assert bar is None


# ------------------------------------------------------------------ the SDE sampler's method
def test_the_sde_takes_a_fixed_step_solvers_steps_and_nothing_else():
    """Euler–Maruyama whatever the fixed-step method: rk4 and euler draw the same samples."""
    model = exact_model(GAUSS, make_process("vp"), equal(2), shape=(2,))

    def draw(solver):
        g = torch.Generator().manual_seed(3)
        return sample(model, 5, generator=g, method="sde", solver=solver, dtype=torch.float64)

    rk4 = draw(SolverSettings("rk4", 30, rtol=1e-3))
    assert torch.equal(rk4, draw(SolverSettings("euler", 30)))
    assert not torch.equal(rk4, draw(SolverSettings("euler", 31)))


def test_the_sde_refuses_an_adaptive_solver_in_one_line():
    model = exact_model(GAUSS, make_process("vp"), equal(2), shape=(2,))
    for fn in (sample, lambda *a, **kw: sample_path(*a, **kw)[0]):
        with pytest.raises(ValueError, match="reverse SDE is Euler–Maruyama") as e:
            fn(model, 2, generator=torch.Generator(), method="sde",
               solver=SolverSettings("dopri5"))  # fmt: skip
        assert "\n" not in str(e.value)


def test_psm_sample_sde_on_a_run_whose_eval_solver_is_adaptive(make_run, tmp_path, capsys):
    """The command hands the SDE the run's step budget (``eval.steps``) as Euler–Maruyama."""
    from psm.training.train import train_block

    run = make_run(eval={"solver": "dopri5", "steps": 12}, train={"steps": 5})
    assert [train_block(run, b).state for b in range(3)] == ["done"] * 3
    out = tmp_path / "s.npz"
    code, _, err = run_cli(capsys, "sample", run.path, "-n", 7, "--method", "sde", "--out", out,
                           "--no-progress")  # fmt: skip
    assert code == 0, err
    assert "Euler–Maruyama 12 steps" in err
    import numpy as np

    with np.load(out) as z:
        assert z["samples"].shape == (7, 2)


# ------------------------------------------------------------------ names
def test_a_grid_nets_time_is_the_raw_grid_point_floored_at_t0():
    from psm.core.model import BlockModel
    from psm.core.partition import grid

    part = grid([5e-5, 0.5, 1.0], t0=1e-4)
    model = BlockModel(make_process("vp"), part, [lambda x, t: x] * 3)
    assert [part.time_point(b) for b in range(3)] == [5e-5, 0.5, 1.0]  # the edges as given
    assert [model.net_time(b) for b in range(3)] == [1e-4, 0.5, 1.0]  # where the nets run
    assert not hasattr(model, "time_point")
