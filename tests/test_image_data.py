"""Image data: format readers, ``psm data prepare``, and :class:`ImageDataset`.

Every source is prepared from tiny files written in its real on-disk format
(``image_files.py``), and the prepared pixels are compared with the arrays that were written.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import image_files as W
from psm.commands import data as data_cmd
from psm.data import sources
from psm.data.base import DataError
from psm.data.formats import RESAMPLE, read_idx
from psm.data.images import ImageArrays, ImageDataset, image_dataset, load_prepared
from psm.data.prepare import FORMAT, META_FILE, TRAIN_FILE, prepare, read_meta
from psm.errors import PSMError

META_KEYS = {
    "format",
    "name",
    "shape",
    "dtype",
    "levels",
    "n_train",
    "n_test",
    "split",
    "provenance",
}
PROVENANCE_KEYS = {"kind", "path", "files", "folders", "options", "psm_version", "created"}


# --------------------------------------------------------------------------- helpers
def data_cli(capsys, *argv) -> tuple[int, str, str]:
    """``psm data ...`` through :func:`psm.commands.data.add`, with the CLI's error rule
    (a PSMError is one line on stderr and exit code 2)."""
    parser = argparse.ArgumentParser(prog="psm")
    data_cmd.add(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *map(str, argv)])
    try:
        code = int(args.func(args) or 0)
    except PSMError as e:
        print(f"psm: error: {e}", file=sys.stderr)
        code = 2
    out, err = capsys.readouterr()
    return code, out, err


def one_line(excinfo: pytest.ExceptionInfo, *parts: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


def prep(source: str, path: Path | None, out: Path, **kw) -> dict:
    return prepare(source, path, out, progress=False, **kw)


def arrays(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    train, test = np.load(out / "train.npy"), np.load(out / "test.npy")
    return train, test, np.load(out / "train_mean.npy"), json.loads((out / META_FILE).read_text())


def check_prepared(out: Path, train: np.ndarray, test: np.ndarray, levels: int = 256) -> dict:
    """The directory holds exactly ``train``/``test`` and a consistent mean and meta."""
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["train.npy", "test.npy", "train_mean.npy", "meta.json"]
    )
    got_train, got_test, mean, meta = arrays(out)
    assert got_train.dtype == np.uint8 and got_test.dtype == np.uint8
    np.testing.assert_array_equal(got_train, train)
    np.testing.assert_array_equal(got_test, test)
    assert mean.dtype == np.float64 and mean.shape == train.shape[1:]
    np.testing.assert_allclose(mean, train.astype(np.float64).mean(axis=0), rtol=0, atol=1e-12)
    assert set(meta) == META_KEYS and set(meta["provenance"]) == PROVENANCE_KEYS
    assert meta["format"] == FORMAT and meta["dtype"] == "uint8"
    assert meta["shape"] == list(train.shape[1:]) and meta["levels"] == levels
    assert (meta["n_train"], meta["n_test"]) == (len(train), len(test))
    assert meta["provenance"]["kind"] == meta["name"]
    assert np.load(out / TRAIN_FILE, mmap_mode="r").shape == train.shape  # memory-mappable
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    return meta


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- digits and the CLI
def test_prepare_digits_through_the_cli(tmp_path, capsys):
    from sklearn.datasets import load_digits

    out = tmp_path / "digits"
    code, stdout, err = data_cli(capsys, "prepare", "digits", "--out", out, "--no-progress")
    assert code == 0, err
    assert stdout.strip() == str(out) and "1438 train + 359 test" in err
    images = load_digits().images.astype(np.uint8)[:, None]
    perm = np.random.default_rng(0).permutation(len(images))  # the documented fixed split
    meta = check_prepared(out, images[perm[:1438]], images[perm[1438:]], levels=17)
    assert meta["name"] == "digits" and meta["shape"] == [1, 8, 8]
    assert meta["split"]["seed"] == 0 and meta["split"]["test_fraction"] == 0.2
    assert meta["provenance"]["path"] is None
    assert meta["provenance"]["files"][0]["path"].endswith("digits.csv.gz")
    prepared, bundled = ImageDataset.open(out), ImageDataset.digits()
    assert torch.equal(prepared.test_set(359, seed=1), bundled.test_set(359, seed=1))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(prepared.sample(64, g1), bundled.sample(64, g2))
    code, stdout, _ = data_cli(capsys, "info", out)
    assert code == 0 and "digits: 1438 train + 359 test images, 1x8x8, 17 levels" in stdout
    code, stdout, _ = data_cli(capsys, "info", out, "--json")
    assert code == 0 and json.loads(stdout) == meta


def test_existing_out_is_refused_and_untouched(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, stdout, err = data_cli(capsys, "prepare", "digits", "--out", out, "--no-progress")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and stdout == ""
    assert lines[0].startswith("psm: error: ") and "not empty" in lines[0]
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError) as e:
        prep("digits", None, tmp_path / "f")
    one_line(e, "not a folder")


def test_empty_out_folder_is_filled(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    prep("digits", None, out)
    assert (out / META_FILE).is_file()


def test_cli_bad_inputs_are_one_line(tmp_path, capsys):
    cases = [
        (["prepare", "mnist", "--out", tmp_path / "a"], "mnist: needs --from PATH"),
        (["prepare", "digits", "--from", tmp_path, "--out", tmp_path / "a"], "drop --from"),
        (
            ["prepare", "cifar10", "--from", tmp_path, "--out", tmp_path / "a", "--size", "8"],
            "--size applies to the folder source only",
        ),
        (
            ["prepare", "mnist", "--from", tmp_path / "nope", "--out", tmp_path / "a"],
            "does not exist",
        ),
        (["info", tmp_path], "has no meta.json"),
    ]
    for argv, match in cases:
        code, _, err = data_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and match in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_cli_sources_match_the_library():
    assert data_cmd.SOURCES == sources.SOURCES


# --------------------------------------------------------------------------- MNIST
@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    train, test = W.rng_images(7, (28, 28), 1), W.rng_images(3, (28, 28), 2)
    W.write_mnist(tmp_path / "src", train, test, gz=gz)
    prep("mnist", tmp_path / "src", tmp_path / "out")
    meta = check_prepared(tmp_path / "out", train[:, None], test[:, None])
    assert meta["name"] == "mnist" and meta["shape"] == [1, 28, 28]
    files = {f["path"]: f["bytes"] for f in meta["provenance"]["files"]}
    ext = ".gz" if gz else ""
    assert set(files) == {f"{n}{ext}" for n in sources.MNIST_FILES}
    labels = tmp_path / "src" / f"t10k-labels-idx1-ubyte{ext}"
    assert files[labels.name] == labels.stat().st_size


def test_mnist_missing_and_bad_files(tmp_path):
    src = tmp_path / "src"
    W.write_mnist(src, W.rng_images(2, (28, 28), 1), W.rng_images(2, (28, 28), 2), gz=True)
    (src / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        prep("mnist", src, tmp_path / "out")
    one_line(e, f"mnist: {src} has no t10k-labels-idx1-ubyte[.gz]", "yann.lecun.com/exdb/mnist")
    W.write_idx(src / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8))  # 5 labels, 2 images
    with pytest.raises(DataError) as e:
        prep("mnist", src, tmp_path / "out")
    one_line(e, "5 labels for 2 images")
    raw = (src / "t10k-labels-idx1-ubyte").read_bytes()
    (src / "t10k-labels-idx1-ubyte").write_bytes(raw[:-2])
    with pytest.raises(DataError) as e:
        read_idx(src / "t10k-labels-idx1-ubyte")
    one_line(e, "the file holds 3")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- CIFAR-10
def _cifar_batches(n: int = 3) -> list[np.ndarray]:
    return [W.rng_images(n + i, (3, 32, 32), 10 + i) for i in range(6)]


@pytest.mark.parametrize("kind", ["bin", "py", "py2"])
def test_cifar10(tmp_path, kind):
    batches = _cifar_batches()
    folder = tmp_path / "src" / f"cifar-10-batches-{'bin' if kind == 'bin' else 'py'}"
    folder.mkdir(parents=True)
    write = {"bin": W.write_cifar_bin, "py": W.write_cifar_py, "py2": W.write_cifar_py2}[kind]
    suffix = ".bin" if kind == "bin" else ""
    for i, b in enumerate(batches[:5], 1):
        write(folder / f"data_batch_{i}{suffix}", b)
    write(folder / f"test_batch{suffix}", batches[5])
    meta = prep("cifar10", tmp_path / "src", tmp_path / "out")
    check_prepared(tmp_path / "out", np.concatenate(batches[:5]), batches[5])
    assert meta["shape"] == [3, 32, 32] and meta["n_train"] == sum(map(len, batches[:5]))
    assert [f["path"] for f in meta["provenance"]["files"]][
        -1
    ] == folder.name + f"/test_batch{suffix}"


def test_cifar10_missing_batch_and_bad_size(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for i, b in enumerate(_cifar_batches()[:5], 1):
        W.write_cifar_bin(folder / f"data_batch_{i}.bin", b)
    with pytest.raises(DataError) as e:
        prep("cifar10", tmp_path, tmp_path / "out")
    one_line(e, f"cifar10: {folder} has no test_batch.bin", "www.cs.toronto.edu/~kriz/cifar.html")
    (folder / "test_batch.bin").write_bytes(b"\0" * 3074)
    with pytest.raises(DataError) as e:
        prep("cifar10", tmp_path, tmp_path / "out")
    one_line(e, "3074 bytes is not a whole number of 3073-byte")
    with pytest.raises(DataError) as e:
        prep("cifar10", tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin", tmp_path / "o")
    one_line(e, "is a file, not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        prep("cifar10", empty, tmp_path / "out")
    one_line(e, "has no data_batch_1.bin or data_batch_1", "cifar-10-batches-py/")


def test_malicious_pickle_is_refused(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = _cifar_batches()
    for i, b in enumerate(batches[:5], 1):
        W.write_cifar_py(folder / f"data_batch_{i}", b)
    marker = tmp_path / "PWNED"
    W.write_evil_pickle(folder / "test_batch", marker)
    code, _, err = data_cli(
        capsys, "prepare", "cifar10", "--from", tmp_path, "--out", tmp_path / "out", "--no-progress"
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert "asks for posix.system" in lines[0] or "asks for os.system" in lines[0]
    assert "refused (nothing was run)" in lines[0] and "test_batch" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- CelebA
def _celeba_expected(path: Path) -> np.ndarray:
    """The documented rule, restated: shorter side to 64 (Lanczos), centre crop."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    nw, nh = (64, round(h * 64 / w)) if w <= h else (round(w * 64 / h), 64)
    im = im.resize((nw, nh), resample=Image.Resampling.LANCZOS)
    left, top = (nw - 64) // 2, (nh - 64) // 2
    return np.asarray(im.crop((left, top, left + 64, top + 64))).transpose(2, 0, 1)


def test_celeba64(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "IMAGE_CHUNK", 2)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (86, 70, 3), dtype=np.uint8) for _ in range(6)]
    images[0] = np.full((86, 70, 3), (200, 40, 90), np.uint8)  # flat colour survives exactly-ish
    parts = [0, 1, 0, 2, 0, 2]
    names = W.write_celeba(tmp_path / "src", images, parts)
    meta = prep("celeba64", tmp_path / "src", tmp_path / "out", workers=2)
    folder = tmp_path / "src" / "img_align_celeba"
    expect = {n: _celeba_expected(folder / n) for n in names}
    train = np.stack([expect[n] for n, p in zip(names, parts) if p == 0])
    test = np.stack([expect[n] for n, p in zip(names, parts) if p == 2])
    check_prepared(tmp_path / "out", train, test)
    assert meta["shape"] == [3, 64, 64] and (meta["n_train"], meta["n_test"]) == (3, 2)
    assert np.abs(train[0].astype(int) - np.array([200, 40, 90])[:, None, None]).max() <= 3
    assert "partition 0" in meta["split"]["rule"] and "1" in meta["split"]["rule"]
    assert meta["provenance"]["options"]["size"] == 64
    assert RESAMPLE.name in meta["provenance"]["options"]["resize"]
    (entry,) = meta["provenance"]["folders"]
    assert entry["path"] == "img_align_celeba" and entry["images"] == 5  # val image not read


def test_celeba64_missing_files(tmp_path):
    images = [np.zeros((70, 70, 3), np.uint8)] * 3
    names = W.write_celeba(tmp_path, images, [0, 1, 2])
    (tmp_path / "img_align_celeba" / names[2]).unlink()
    with pytest.raises(DataError) as e:
        prep("celeba64", tmp_path, tmp_path / "out")
    one_line(e, f"has no {names[2]}", "1 of the 3 images", "mmlab.ie.cuhk.edu.hk")
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(DataError) as e:
        prep("celeba64", tmp_path, tmp_path / "out")
    one_line(e, f"celeba64: {tmp_path} has no list_eval_partition.txt", "img_align_celeba/")


# --------------------------------------------------------------------------- ImageNet-64
def test_imagenet64_npz_batches_in_numeric_order(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "NPZ_CHUNK_ROWS", 2)  # several reads per member
    batches = [W.rng_images(3, (3, 64, 64), 20 + i) for i in range(11)]
    part1, part2 = tmp_path / "src" / "part1", tmp_path / "src" / "part2"
    part1.mkdir(parents=True)
    part2.mkdir()
    for i, b in enumerate(batches[:10], 1):  # two unpacked archives side by side
        W.write_imagenet_npz(
            (part1 if i <= 5 else part2) / f"train_data_batch_{i}.npz", b, compressed=i % 2 == 0
        )
    W.write_imagenet_npz(tmp_path / "src" / "val_data.npz", batches[10], compressed=True)
    meta = prep("imagenet64", tmp_path / "src", tmp_path / "out")
    check_prepared(tmp_path / "out", np.concatenate(batches[:10]), batches[10])
    assert meta["provenance"]["files"][9]["path"] == "part2/train_data_batch_10.npz"
    assert meta["split"]["rule"].startswith("official")


def test_imagenet64_missing_and_bad_npz(tmp_path):
    for i in range(1, 11):
        W.write_imagenet_npz(
            tmp_path / f"train_data_batch_{i}.npz",
            W.rng_images(1, (3, 64, 64), i),
            compressed=False,
        )
    with pytest.raises(DataError) as e:
        prep("imagenet64", tmp_path, tmp_path / "out")
    one_line(e, f"imagenet64: {tmp_path} has no val_data.npz", "image-net.org")
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 100), np.uint8))
    with pytest.raises(DataError) as e:
        prep("imagenet64", tmp_path, tmp_path / "out")
    one_line(e, "val_data.npz: 'data' is uint8 [2, 100], expected uint8 [N, 12288]")
    np.savez(tmp_path / "val_data.npz", data=np.array([None, 1], dtype=object))
    with pytest.raises(DataError) as e:
        prep("imagenet64", tmp_path, tmp_path / "out")
    one_line(e, "object (pickled) array")


def test_imagenet64_png_folders(tmp_path):
    train = W.rng_images(3, (64, 64, 3), 5)
    test = W.rng_images(2, (64, 64, 3), 6)
    for i, im in enumerate(train):
        W.write_png(tmp_path / "train_64x64" / f"{i}.png", im)
    for i, im in enumerate(test):
        W.write_png(tmp_path / "valid_64x64" / f"{i}.png", im)
    prep("imagenet64", tmp_path, tmp_path / "out")
    check_prepared(tmp_path / "out", train.transpose(0, 3, 1, 2), test.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------- any folder
def _png_folder(root: Path, n: int = 10) -> tuple[list[Path], list[np.ndarray]]:
    images = list(W.rng_images(n, (6, 9, 3), 7))
    paths = [root / ("a" if i % 2 else "b/c") / f"{i:02d}.png" for i in range(n)]
    for p, im in zip(paths, images):
        W.write_png(p, im)
    (root / "b" / "._05.png").write_bytes(b"not an image")  # macOS resource fork: skipped
    (root / "notes.txt").write_text("not an image")
    order = sorted(range(n), key=lambda i: paths[i].relative_to(root).as_posix())
    return [paths[i] for i in order], [images[i] for i in order]


def test_folder_keeps_size_and_splits_by_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "IMAGE_CHUNK", 3)
    paths, images = _png_folder(tmp_path / "src")
    meta = prep("folder", tmp_path / "src", tmp_path / "out", test_fraction=0.2, seed=3)
    chw = np.stack(images).transpose(0, 3, 1, 2)
    perm = np.random.default_rng(3).permutation(10)  # the documented rule
    check_prepared(tmp_path / "out", chw[perm[:8]], chw[perm[8:]])
    assert meta["shape"] == [3, 6, 9] and meta["split"] == {
        "rule": meta["split"]["rule"],
        "seed": 3,
        "test_fraction": 0.2,
    }
    (entry,) = meta["provenance"]["folders"]
    assert entry["images"] == 10 and entry["bytes"] == sum(p.stat().st_size for p in paths)
    prep("folder", tmp_path / "src", tmp_path / "grey", channels=1, test_fraction=0.2, seed=3)
    grey = np.load(tmp_path / "grey" / "train.npy")
    want = np.stack([np.asarray(Image.open(paths[i]).convert("L")) for i in perm[:8]])
    np.testing.assert_array_equal(grey[:, 0], want)


def test_folder_grey_default_and_size(tmp_path):
    for i in range(4):
        W.write_png(tmp_path / "src" / f"{i}.png", W.rng_images(1, (20 + i, 16), i)[0])
    with pytest.raises(DataError) as e:
        prep("folder", tmp_path / "src", tmp_path / "out")
    msg = one_line(e, "the first image is 16x20", "--size")
    assert msg.startswith("folder: ") and re.search(r"[123]\.png is 16x2[123], ", msg)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    meta = prep("folder", tmp_path / "src", tmp_path / "out", size=8, test_fraction=0.25)
    assert meta["shape"] == [1, 8, 8] and (meta["n_train"], meta["n_test"]) == (3, 1)
    assert meta["provenance"]["options"]["size"] == 8


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch):
    _png_folder(tmp_path / "src")
    calls = []
    real = sources.load_image

    def load_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sources, "IMAGE_CHUNK", 2)
    monkeypatch.setattr(sources, "load_image", load_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prep("folder", tmp_path / "src", tmp_path / "out", workers=1)
    assert len(calls) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_folder_bad_inputs(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError) as e:
        prep("folder", tmp_path / "src", tmp_path / "out")
    one_line(e, "has no .png/.jpg/.jpeg files")
    W.write_png(tmp_path / "src" / "a.png", np.zeros((4, 4), np.uint8))
    W.write_png(tmp_path / "src" / "b.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "src" / "c.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError) as e:
        prep("folder", tmp_path / "src", tmp_path / "out", test_fraction=0.3)
    one_line(e, "c.png: not a readable image")
    with pytest.raises(DataError) as e:
        prep("folder", tmp_path / "src", tmp_path / "out", test_fraction=1.5)
    one_line(e, "test fraction must be in (0, 1)")
    with pytest.raises(DataError) as e:
        prep("folder", tmp_path / "src", tmp_path / "out", channels=2)
    one_line(e, "--channels must be 1 or 3")
    with pytest.raises(DataError) as e:
        prep("folder", tmp_path / "src", tmp_path / "out", workers=0)
    one_line(e, "--workers must be >= 1")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the dataset
@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return ImageDataset.digits()


def test_digits_dataset_attributes(digits):
    assert digits.name == "digits" and digits.shape == (1, 8, 8) and digits.levels == 17
    assert (digits.n_train, digits.n_test) == (1438, 359) and digits.entropy is None
    assert digits.log_scale_per_dim == 0.0 and not digits.has_density
    assert digits.files()[0].name == "digits.csv.gz" and digits.files()[0].is_file()


def test_sampling_is_reproducible_and_seeded(digits):
    a = digits.sample(64, torch.Generator().manual_seed(1))
    b = digits.sample(64, torch.Generator().manual_seed(1))
    c = digits.sample(64, torch.Generator().manual_seed(2))
    assert a.shape == (64, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(1)
    first, second = digits.sample(64, g), digits.sample(64, g)
    assert torch.equal(first, a) and not torch.equal(second, a)  # fresh batches


def test_sample_is_the_documented_map(digits):
    """Replaying the generator: index, flip, noise, then y = s ((k + u)/L - m)."""
    ds = ImageDataset(digits.arrays, scale=2.0)
    y = ds.sample(32, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, ds.n_train, (32,), generator=g)
    k = torch.from_numpy(ds.arrays.train)[idx]
    flipped = torch.rand(32, generator=g) < 0.5
    k = torch.where(flipped.view(-1, 1, 1, 1), k.flip(-1), k)
    u = torch.rand(k.shape, generator=g)
    mean = torch.from_numpy(ds.arrays.train_mean)
    want = 2.0 * ((k.double() + u.double()) / 17 - (mean + 0.5) / 17)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=1e-5)


def test_flips_happen_about_half_the_time():
    left = np.zeros((1, 1, 4, 6), np.uint8)
    left[..., :2] = 255  # bright on the left only
    ds = ImageDataset(
        ImageArrays("x", 256, left, left, left[0].astype(np.float64)),
        center=False,
        dequantize=False,
    )
    y = ds.sample(4000, torch.Generator().manual_seed(0))
    flipped = (y[..., -1] > 0).all(dim=(1, 2))
    assert 0.46 < flipped.float().mean().item() < 0.54
    assert torch.equal(
        y[~flipped], ds.test_set(1, dequantize=False).expand(int((~flipped).sum()), -1, -1, -1)
    )
    no_flip = ImageDataset(ds.arrays, center=False, dequantize=False, flip=False)
    assert (no_flip.sample(500, torch.Generator().manual_seed(0))[..., -1] < 0).all()


@pytest.mark.parametrize("levels", [17, 256])
def test_dequantized_values_stay_in_their_cell(levels):
    ds = ImageDataset(
        ImageArrays(
            "x",
            levels,
            np.zeros((1, 1, 2, 2), np.uint8),
            np.zeros((1, 1, 2, 2), np.uint8),
            np.zeros((1, 2, 2)),
        )
    )
    k = torch.arange(levels, dtype=torch.uint8).repeat(20000)
    x = ds.levels_to_unit(k, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32
    lo, hi = k.float() / levels, (k.float() + 1) / levels
    assert (x >= lo).all() and (x < hi).all()
    top = x[k == levels - 1]  # the top cell is reached from both ends
    assert top.min() < lo[k == levels - 1][0] + 0.01 / levels and top.max() > 1 - 0.01 / levels
    assert torch.equal(ds.levels_to_unit(k, None), k.float() / (levels - 1))


@pytest.mark.parametrize("center,scale", [(True, 1.0), (False, 2.0), (True, 0.5)])
def test_to_unit_inverts_the_map(digits, center, scale):
    ds = ImageDataset(digits.arrays, center=center, scale=scale)
    y = ds.test_set(100, seed=4)
    k = torch.from_numpy(np.array(ds.arrays.test[:100]))
    x = ds.levels_to_unit(k, torch.Generator().manual_seed(4))
    torch.testing.assert_close(ds.to_unit(y), x, rtol=0, atol=1e-6)
    assert ds.log_scale_per_dim == pytest.approx(math.log(scale))
    plain = ds.test_set(100, seed=4, dequantize=False)
    torch.testing.assert_close(
        ds.to_unit(plain, dequantize=False), k.float() / 16, rtol=0, atol=1e-6
    )
    assert ds.to_unit(torch.full((1, 1, 8, 8), 1e3)).max() == 1.0


def test_centred_data_have_zero_mean(digits):
    y = digits.sample(40000, torch.Generator().manual_seed(0))
    assert abs(y.mean().item()) < 2e-3
    unflipped = ImageDataset(digits.arrays, flip=False).sample(
        40000, torch.Generator().manual_seed(0)
    )
    assert unflipped.mean(0).abs().max().item() < 0.01  # per pixel too
    raw = ImageDataset(digits.arrays, center=False).sample(4000, torch.Generator().manual_seed(0))
    assert raw.mean().item() < -0.1  # digits are mostly dark: 1/2 is not their mean


def test_test_set(digits):
    a, b = digits.test_set(50, seed=1), digits.test_set(50, seed=1)
    assert a.shape == (50, 1, 8, 8) and a.device.type == "cpu" and torch.equal(a, b)
    assert not torch.equal(a, digits.test_set(50, seed=2))
    assert torch.equal(digits.test_set(10**6, seed=1)[:50], a)  # first n, one draw per image
    assert len(digits.test_set(10**6)) == 359
    authors = digits.test_set(30, dequantize=False)  # k/(L-1) minus the train mean/(L-1)
    k = torch.from_numpy(np.array(digits.arrays.test[:30])).double()
    want = (k - torch.from_numpy(digits.arrays.train_mean)) / 16
    torch.testing.assert_close(authors.double(), want, rtol=0, atol=1e-6)


def test_bits_per_dim(digits):
    ds = ImageDataset(digits.arrays, scale=2.0)
    d = 64
    assert ds.bits_per_dim(d * math.log(2.0)) == pytest.approx(math.log2(17))
    nll = torch.tensor([100.0, 120.0])
    want = (nll - d * math.log(2.0)) / (d * math.log(2)) + math.log2(17)
    torch.testing.assert_close(ds.bits_per_dim(nll), want)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-bin"
    folder.mkdir()
    for i in range(1, 6):
        W.write_cifar_bin(folder / f"data_batch_{i}.bin", W.rng_images(20, (3, 32, 32), i))
    W.write_cifar_bin(folder / "test_batch.bin", W.rng_images(10, (3, 32, 32), 9))
    prep("cifar10", root, root / "prepared")
    return root / "prepared"


def test_prepared_dataset_resident_and_memmap_agree(cifar_dir):
    resident = ImageDataset.open(cifar_dir)
    mapped = ImageDataset.open(cifar_dir, max_device_bytes=0)
    assert resident.resident and not mapped.resident
    assert resident.shape == (3, 32, 32) and (resident.n_train, resident.n_test) == (100, 10)
    a = resident.sample(16, torch.Generator().manual_seed(3))
    b = mapped.sample(16, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert [p.name for p in resident.files()] == [
        "train.npy",
        "test.npy",
        "train_mean.npy",
        "meta.json",
    ]
    assert image_dataset("cifar10", cifar_dir).n_train == 100
    with pytest.raises(DataError) as e:
        image_dataset("mnist", cifar_dir)
    one_line(e, "holds 'cifar10' images, not 'mnist'")
    with pytest.raises(DataError) as e:
        image_dataset("cifar10")
    one_line(e, "data.path is required for cifar10")
    assert image_dataset("digits").levels == 17


def test_broken_prepared_dirs_are_one_line_errors(cifar_dir, tmp_path):
    import shutil

    def broken(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(cifar_dir, d)
        return d

    d = broken("tag")
    meta = json.loads((d / META_FILE).read_text())
    (d / META_FILE).write_text(json.dumps({**meta, "format": "psm-images/0"}))
    with pytest.raises(DataError) as e:
        load_prepared(d)
    one_line(e, "format 'psm-images/0' is not 'psm-images/1'")
    d = broken("shape")
    (d / META_FILE).write_text(json.dumps({**meta, "shape": [1, 32, 32]}))
    with pytest.raises(DataError) as e:
        load_prepared(d)
    one_line(e, "train.npy: uint8 [100, 3, 32, 32] does not match meta.json")
    d = broken("count")
    (d / META_FILE).write_text(json.dumps({**meta, "n_test": 11}))
    with pytest.raises(DataError) as e:
        ImageDataset.open(d)
    one_line(e, "test.npy")
    d = broken("truncated")
    raw = (d / TRAIN_FILE).read_bytes()
    (d / TRAIN_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as e:
        load_prepared(d)
    one_line(e, "train.npy: unreadable or truncated train array")
    d = broken("missing")
    (d / "train_mean.npy").unlink()
    with pytest.raises(DataError) as e:
        load_prepared(d)
    one_line(e, "has no train_mean.npy")
    with pytest.raises(DataError) as e:
        read_meta(tmp_path / "nowhere")
    one_line(e, "no such folder")
