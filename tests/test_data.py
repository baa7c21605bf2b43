"""Data sources: exact densities, sampling, centring, and user point files.

Grid checks use the midpoint rule on cells ``[lo + k h, lo + (k+1) h)``. Its accuracy:

- Gaussian-smoothed densities (noise std σ, grid h ≤ σ/1.5): the midpoint rule on R² is
  spectrally accurate, error ≈ 2 exp(-2π²σ²/h²) < 1e-19, and every grid leaves ≥ 8σ of
  margin (truncated mass < 1e-14); so 1e-6 leaves room only for float64 round-off.
- Boxes whose edges lie on cell boundaries (checkerboard, HG, TY's unrotated boxes) are
  integrated exactly.
- TY's 7 rotated boxes cut ~800 cells, each off by ≤ jump·h² ≈ 4e-5; for its two 45° boxes the
  grid lattice aliases with the edges, so those errors do not average out (≤ 1/14 of their
  7.4e-3 weight each). The observed error is 1.2e-3; the tolerance is 3e-3. Each TY/HG
  component is also checked exactly on a grid in its own frame (:func:`test_paper_components`).
"""

from __future__ import annotations

import math
import pickle
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from psm.data import TOYS, DataError, Mixture, make_dataset
from psm.data.classic import ENTROPY, Rings, moons, spirals, swissroll
from psm.data.mixture import load_paper_spec
from psm.data.points import PointsDataset

SYNTHETIC = sorted(TOYS)
DENSITY = [n for n in SYNTHETIC if make_dataset(n).has_density]

# name -> (lo, h, cells per axis, fine cells per histogram bin); edges of boxes on cell edges
GRID: dict[str, tuple[float, float, int, int]] = {
    "ty": (-1.6, 0.01, 320, 10),
    "hg": (-2.5, 0.025, 200, 8),
    "checkerboard": (-4.5, 0.05, 180, 9),
    "8gaussians": (-6.0, 0.1, 120, 6),
    "rings": (-4.0, 0.04, 200, 8),
    "moons": (-10.0, 0.2, 100, 4),
    "spirals": (-4.0, 1 / 15, 120, 6),
    "swissroll": (-4.5, 0.1, 90, 3),
}
MASS_TOL = {"ty": 3e-3}  # see the module docstring; 1e-6 otherwise


def test_every_density_set_has_a_grid() -> None:
    assert set(DENSITY) == set(GRID)
    assert "pinwheel" in SYNTHETIC and "pinwheel" not in DENSITY


@cache
def density_grid(name: str) -> tuple[Tensor, Tensor]:
    """``(log p [n, n], p [n, n])`` at the cell centres of ``GRID[name]`` (uncentred set)."""
    lo, h, n, _ = GRID[name]
    ax = lo + h * (torch.arange(n, dtype=torch.float64) + 0.5)
    xx, yy = torch.meshgrid(ax, ax, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    ds = make_dataset(name, center=False)
    lp = torch.cat([ds.log_prob(c) for c in pts.split(32768)]).reshape(n, n)
    return lp, lp.exp()


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- exact densities ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ty", "hg"])
def test_paper_toy_nll_matches_entropy(name: str) -> None:
    ds = make_dataset(name)
    x = ds.sample(200_000, g(0))
    nll = -ds.log_prob(x.double()).mean().item()
    # the spec's entropy is a 1e6-sample MC value (±0.001); this estimate's std error ≈ 0.002
    assert abs(nll - ds.entropy) < 0.01


@pytest.mark.parametrize("name", sorted(GRID))
def test_density_integrates_to_one(name: str) -> None:
    _, p = density_grid(name)
    h = GRID[name][1]
    mass = p.sum().item() * h * h
    assert abs(mass - 1.0) < MASS_TOL.get(name, 1e-6), mass


@pytest.mark.parametrize("name", sorted(ENTROPY))
def test_stored_entropy_matches_quadrature(name: str) -> None:
    lp, p = density_grid(name)
    h = GRID[name][1]
    ent = -(torch.where(p > 0, p * lp, 0.0)).sum().item() * h * h
    assert make_dataset(name).entropy == ENTROPY[name]
    assert abs(ent - ENTROPY[name]) < 2e-5  # stored values are rounded to 1e-5


@pytest.mark.parametrize("name", sorted(GRID))
def test_density_matches_histogram(name: str) -> None:
    lo, h, n, b = GRID[name]
    _, p = density_grid(name)
    nb = math.ceil(n / b)
    mass = torch.nn.functional.pad(p * h * h, (0, nb * b - n, 0, nb * b - n))
    prob = mass.reshape(nb, b, nb, b).sum((1, 3)).reshape(-1)
    m = 100_000
    ds = make_dataset(name, center=False)
    x = ds.sample(m, g(1)).double()
    assert (ds.log_prob(x[:10_000]) > -50).all()  # no sample where there is ~no density
    idx = torch.floor((x - lo) / h).long()
    inside = ((idx >= 0) & (idx < n)).all(1)
    assert (~inside).sum() <= 2  # the grid holds all but < 1e-9 of the mass
    cell = (idx[inside] // b).clamp_max(nb - 1)
    counts = torch.bincount(cell[:, 0] * nb + cell[:, 1], minlength=nb * nb).double()
    expect = m * prob
    z = (counts - expect) / torch.sqrt(expect + 1.0)
    assert z.abs().max() < 6.0
    big = expect >= 5
    chi2 = ((counts[big] - expect[big]) ** 2 / expect[big]).sum().item()
    assert chi2 / big.sum().item() < 1.5  # χ²/dof ≈ 1 ± √(2/dof), dof ≥ 100


@pytest.mark.parametrize("name", ["TY", "HG"])
def test_paper_components(name: str) -> None:
    """Each component alone integrates to 1 on a grid in its own (rotated) frame, exactly."""
    for comp in load_paper_spec()["datasets"][name]["components"]:
        single = Mixture("c", [comp], center=False)
        if comp["kind"] == "box":
            low = torch.tensor(comp["low"], dtype=torch.float64)
            high = torch.tensor(comp["high"], dtype=torch.float64)
            u = _cell_centres(low, high, 40)
            x = _rot(comp.get("rotation_deg", 0.0)) @ u.T
            x = x.T - torch.tensor(comp.get("offset", [0.0, 0.0]), dtype=torch.float64)
            area = (high - low).prod().item()
        else:
            s = math.sqrt(comp["var"])
            mean = torch.tensor(comp["mean"], dtype=torch.float64)
            x = _cell_centres(mean - 9 * s, mean + 9 * s, 36)
            area = (18 * s) ** 2
        mass = single.log_prob(x).exp().mean().item() * area
        assert abs(mass - 1.0) < 1e-9, comp


def _cell_centres(low: Tensor, high: Tensor, k: int) -> Tensor:
    """Centres of a k×k grid of cells covering the box ``[low, high]``, ``[k², 2]``."""
    f = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    xs = low[0].double() + (high[0] - low[0]).double() * f
    ys = low[1].double() + (high[1] - low[1]).double() * f
    xx, yy = torch.meshgrid(xs, ys, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def _rot(deg: float) -> Tensor:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def test_rotated_offset_box_mixture() -> None:
    comps = [
        {"kind": "box", "weight": 1, "low": [0, 0], "high": [2, 1], "rotation_deg": 30.0,
         "offset": [1.0, -0.5]},
        {"kind": "gaussian", "weight": 1, "mean": [3.0, 3.0], "var": 0.05},
    ]  # fmt: skip
    mix = Mixture("rot", comps, center=False)
    rot, offset = _rot(30.0), torch.tensor([1.0, -0.5], dtype=torch.float64)
    # inside the box: density 1/2 (weight) × 1/2 (area); the Gaussian is ≥ 12 std away
    u = _cell_centres(torch.tensor([0.0, 0.0]).double(), torch.tensor([2.0, 1.0]).double(), 20)
    lp = mix.log_prob((rot @ u.T).T - offset)
    assert torch.allclose(lp, torch.full_like(lp, math.log(0.25)), atol=1e-12)
    # just outside each edge: only the Gaussian's far tail is left
    out = torch.tensor([[-0.01, 0.5], [2.01, 0.5], [1.0, -0.01], [1.0, 1.01]], dtype=torch.float64)
    assert (mix.log_prob((rot @ out.T).T - offset) < -50).all()
    # samples: half in the box (its own frame), half near the Gaussian
    x = mix.sample(100_000, g(2)).double()
    uu = (rot.T @ (x + offset).T).T
    in_box = ((uu >= -1e-5) & (uu <= torch.tensor([2.0, 1.0]) + 1e-5)).all(1)
    near_gauss = (x - 3.0).norm(dim=1) < 2.5
    assert (in_box | near_gauss).all() and not (in_box & near_gauss).any()
    assert abs(in_box.double().mean().item() - 0.5) < 0.01
    # exact mean, and centring
    mean = 0.5 * (rot @ torch.tensor([1.0, 0.5], dtype=torch.float64) - offset) + 0.5 * 3.0
    assert torch.allclose(x.mean(0), mean, atol=0.01)
    centred = Mixture("rot", comps, center=True)
    assert torch.allclose(centred.shift, mean, atol=1e-12)
    xc = centred.sample(100_000, g(3)).double()
    assert xc.mean(0).abs().max() < 0.01
    assert torch.allclose(centred.log_prob(x - mean), mix.log_prob(x), atol=1e-9)


@pytest.mark.parametrize("build", [moons, spirals, swissroll])
def test_curve_quadrature_converged(build) -> None:
    coarse, fine = build(), build(panels=2 * _panels(build))
    assert abs(coarse.mass - 1.0) < 1e-12
    x = coarse.sample(4000, g(4)).double()
    assert (coarse.log_prob(x) - fine.log_prob(x)).abs().max() < 1e-9
    far = 5.0 * (2.0 * torch.rand(2000, 2, generator=g(5), dtype=torch.float64) - 1.0)
    assert (coarse.log_prob(far) - fine.log_prob(far)).abs().max() < 1e-5


def _panels(build) -> int:
    """The default panel count of a curve-set builder."""
    return build.__kwdefaults__["panels"]


def test_rings_bessel_form_matches_angle_quadrature() -> None:
    ds = Rings(center=False)
    x = torch.cat([ds.sample(500, g(6)).double(), torch.randn(100, 2, generator=g(7)).double()])
    theta = torch.arange(4096, dtype=torch.float64) * (2 * math.pi / 4096)  # periodic trapezoid
    circle = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    centres = (ds.radii[:, None, None] * circle[None]).reshape(-1, 2)  # [K·4096, 2]
    d2 = torch.cdist(x, centres) ** 2
    s2 = ds.sigma**2
    ref = torch.logsumexp(-d2 / (2 * s2), 1) - math.log(len(centres) * 2 * math.pi * s2)
    assert (ds.log_prob(x) - ref).abs().max() < 1e-9


def test_curve_means_are_exact() -> None:
    assert torch.allclose(moons(center=False).mean, torch.tensor([0.5, -0.25]).double())
    assert torch.allclose(spirals(center=False).mean, torch.zeros(2).double(), atol=1e-12)
    sw = torch.tensor([0.4, 2 / (15 * math.pi)], dtype=torch.float64)
    assert torch.allclose(swissroll(center=False).mean, sw, atol=1e-12)


def test_no_density_raises() -> None:
    ds = make_dataset("pinwheel")
    assert not ds.has_density
    with pytest.raises(DataError, match="pinwheel"):
        ds.log_prob(torch.zeros(3, 2))


# --- sampling -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SYNTHETIC)
def test_sampling_is_seeded_and_pure(name: str) -> None:
    ds = make_dataset(name)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, b, c = ds.sample(1000, g(11)), ds.sample(1000, g(11)), ds.sample(1000, g(12))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never used
    assert a.shape == (1000, 2) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.isfinite(a).all() and a.abs().max() < 10
    assert torch.equal(ds.test_set(100, seed=3), ds.test_set(100, seed=3))


@pytest.mark.parametrize("name", SYNTHETIC)
def test_center(name: str) -> None:
    n = 200_000
    centred, raw = make_dataset(name, center=True), make_dataset(name, center=False)
    x = centred.sample(n, g(21)).double()
    se = x.std(0) / math.sqrt(n)
    assert (x.mean(0).abs() < 5 * se).all(), x.mean(0)
    shift = centred.shift.double()
    y = raw.sample(n, g(22)).double()
    assert ((y.mean(0) - shift).abs() < 5 * se).all()  # the shift is the exact mean
    if centred.has_density:
        pts = y[:500]
        assert torch.allclose(centred.log_prob(pts - shift), raw.log_prob(pts), atol=1e-9)


# --- user point files -----------------------------------------------------------------------


def _points(n: int = 50, d: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) * 2.0 + 5.0


def _in(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> Tensor:
    """For each row of ``a [n, d]``, whether it equals (to float32) some row of ``b [m, d]``."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return torch.cdist(a, b).min(1).values < 1e-4


def _same_rows(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> bool:
    """Whether ``a`` and ``b`` hold the same rows (as a set, up to float32 rounding)."""
    return len(a) == len(b) and bool(_in(a, b).all() and _in(b, a).all())


def test_points_npy_split(tmp_path: Path) -> None:
    arr = _points(50)
    path = tmp_path / "pts.npy"
    np.save(path, arr)
    ds = PointsDataset(path, test_fraction=0.2, center=False, seed=1)
    assert (ds.shape, ds.n_train, ds.n_test) == ((2,), 40, 10) and not ds.has_density
    train, test = ds.train_points, ds.test_set(1000)
    assert _same_rows(torch.cat([train, test]), arr)
    assert not _in(train, test).any()
    again = PointsDataset(path, test_fraction=0.2, center=False, seed=1)
    assert torch.equal(again.test_set(1000), test)
    other = PointsDataset(path, test_fraction=0.2, center=False, seed=2)
    assert not torch.equal(other.test_set(1000), test)
    # samples: train points only, drawn from the generator alone
    state = torch.get_rng_state()
    s = ds.sample(500, g(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(s, ds.sample(500, g(0))) and not torch.equal(s, ds.sample(500, g(1)))
    assert s.shape == (500, 2) and s.dtype == torch.float32
    assert _in(s, train).all()
    # test_set caps at the split and subsets by seed
    assert ds.test_set(4, seed=0).shape == (4, 2)
    assert _in(ds.test_set(4, seed=0), test).all()
    assert not torch.equal(ds.test_set(4, seed=0), ds.test_set(4, seed=1))
    # routed through make_dataset, centred by the train mean
    c = make_dataset("points", path=str(path), test_fraction=0.2, seed=1)
    assert torch.allclose(c.train_points.double().mean(0), torch.zeros(2).double(), atol=1e-5)
    assert torch.allclose(c.test_set(1000) + c.shift.float(), test, atol=1e-5)


@pytest.mark.parametrize("header", ["", "x,y\n", "x , y\r\n"])
def test_points_csv(tmp_path: Path, header: str) -> None:
    arr = _points(30, d=3)
    path = tmp_path / "pts.csv"
    body = "\n".join(",".join(f"{v:.6f}" for v in row) for row in arr)
    path.write_text(header + body + "\n\n")
    ds = PointsDataset(path, test_fraction=0.1, center=False, seed=0)
    assert (ds.shape, ds.n_train, ds.n_test) == ((3,), 27, 3)
    both = torch.cat([ds.train_points, ds.test_set(100)]).double()
    assert _same_rows(both, arr)
    assert ds.sample(10, g(0)).shape == (10, 3)


class _Evil:
    """Pickles to a call that writes a file: must never run when a .npy is loaded."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected message fragment)."""
    cases: dict[str, tuple[Path, str]] = {}

    def npy(name: str, arr: object, fragment: str, allow_pickle: bool = False) -> None:
        p = tmp / f"{name}.npy"
        np.save(p, arr, allow_pickle=allow_pickle)
        cases[name] = (p, fragment)

    def csv(name: str, text: str, fragment: str) -> None:
        p = tmp / f"{name}.csv"
        p.write_text(text)
        cases[name] = (p, fragment)

    cases["missing"] = (tmp / "nope.npy", "no such file")
    (tmp / "pts.txt").write_text("1,2\n3,4\n")
    cases["extension"] = (tmp / "pts.txt", "extension")
    csv("unparsable", "x,y\n1,2\n3,abc\n5,6\n", "line 3")
    csv("ragged", "1,2\n3,4,5\n", "line 2")
    csv("csv_nan", "1,2\n3,nan\n4,5\n", "line 2")
    csv("empty", "x,y\n\n", "no data rows")
    npy("rank1", np.arange(10.0), "shape (10,)")
    npy("rank3", np.zeros((4, 2, 2)), "shape (4, 2, 2)")
    npy("nonfinite", np.array([[0.0, 1.0], [np.inf, 2.0], [3.0, 4.0]]), "infinite")
    npy("few", np.zeros((2, 2)), "too few")
    npy("strings", np.array([["a", "b"], ["c", "d"]]), "not numeric")
    npy("object", np.array([[1.0, None]], dtype=object), "pickled", allow_pickle=True)
    evil = np.empty(1, dtype=object)
    evil[0] = _Evil(tmp / "pwned.txt")
    npy("pickled", evil, "pickled", allow_pickle=True)
    (tmp / "garbage.npy").write_bytes(b"\x00\x01not an array at all" * 3)
    cases["garbage"] = (tmp / "garbage.npy", "not a .npy file")
    np.save(tmp / "full.npy", np.zeros((50, 2)))
    (tmp / "truncated.npy").write_bytes((tmp / "full.npy").read_bytes()[:200])
    cases["truncated"] = (tmp / "truncated.npy", "not a readable .npy file")
    np.savez(tmp / "archive.npz", a=np.zeros((5, 2)))
    (tmp / "archive.npz").rename(tmp / "archive.npy")
    cases["npz"] = (tmp / "archive.npy", "npz")
    return cases


def test_points_bad_inputs(tmp_path: Path) -> None:
    pickle.loads(pickle.dumps(_Evil(tmp_path / "probe.txt")))  # the payload really runs code
    assert (tmp_path / "probe.txt").exists()
    for name, (path, fragment) in _bad_inputs(tmp_path).items():
        with pytest.raises(DataError) as info:
            PointsDataset(path, test_fraction=0.5, center=True, seed=0)
        msg = str(info.value)
        assert "\n" not in msg and str(path) in msg and fragment in msg, (name, msg)
    assert not (tmp_path / "pwned.txt").exists()  # nothing was unpickled


def test_points_split_sizes(tmp_path: Path) -> None:
    path = tmp_path / "three.npy"
    np.save(path, _points(3))
    ds = PointsDataset(path, test_fraction=0.1, center=True, seed=0)
    assert (ds.n_train, ds.n_test) == (2, 1)  # at least one test point
    with pytest.raises(DataError, match="too few"):
        PointsDataset(path, test_fraction=0.5, center=True, seed=0)
    with pytest.raises(DataError, match="test_fraction"):
        PointsDataset(path, test_fraction=1.0, center=True, seed=0)
    with pytest.raises(DataError, match=r"data\.path"):
        make_dataset("points")
