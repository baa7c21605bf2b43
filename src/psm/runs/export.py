"""Exported models: one safetensors file that holds a whole trained run, loadable without it.

``psm export RUN model.safetensors`` (:func:`export_run`) writes, atomically and never over an
existing file:

* tensors ``block.<b>.<name>``: every block's final weights (the EMA of its parameters when the
  run trained with ``train.ema``: the same tensors as ``blocks/NNNN.safetensors``, which is what
  :func:`psm.runs.inference.load_model` reads from a run directory), and what the data map needs
  beyond the config (:data:`MAP_TENSORS`): ``data.train_mean`` (images, float64 ``[C, H, W]``),
  ``data.shift`` (the user's points with ``data.center``, float64 ``[d]``);
* metadata (str -> str): ``format`` (:data:`FORMAT`), ``psm_version``, ``config`` (the run's
  config as JSON), ``config_hash`` and ``hash_scheme``, ``data`` (the data manifest of
  :mod:`psm.runs.data_guard`: shape and each data file's sha256, so an exported model says what
  it was trained on), ``partition`` (kind, edges, t0, blocks), ``shape``, ``data_map`` (how inputs
  map to the model's space: for images levels, scale, centring, dequantization; for points the
  centring), ``blocks`` (each block's step, target, wall time and last loss), ``weights``
  (``"ema"`` or ``"final"``), ``run`` (the directory it was exported from) and ``created``.

:func:`read_export` reads and checks the metadata (format, config against its hash, partition,
data map) without the tensors; :func:`load_blocks` loads the weights into freshly built nets,
refusing a missing, unexpected or misshapen tensor in one line, so a damaged or foreign file never
becomes a random network.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..data import DataError, Dataset
from ..data.images import ImageArrays, ImageData, ImageDataset
from ..data.points import PointsDataset
from ..data.prepare import read_meta
from ..errors import CheckpointError, IncompleteRunError, PSMError, RunError
from .atomic import write_error
from .config import RunConfig, config_hash, legacy_config_hash, validate_config
from .data_guard import check_data, data_manifest, read_manifest
from .ledger import BlockStatus
from .run import Run, _known_executor
from .run_parts import Parts

FORMAT = "psm-export/1"
SUFFIX = ".safetensors"
BLOCK_PREFIX = "block."
MAP_TENSORS = ("data.train_mean", "data.shift")
"""The data map's tensors an export may hold beside the blocks' weights."""


class ExportError(CheckpointError):
    """An exported model that is unreadable, foreign, or does not match its own config."""


# ---------------------------------------------------------------------------- writing
def require_done(run: Run) -> None:
    """Refuse a run with missing or unfinished blocks (named in one line).

    Raises:
        IncompleteRunError: some blocks are not done at their own recorded target.
    """
    missing = run.ledger.not_done()
    if not missing:
        return
    states = [run.ledger.status(b).state for b in missing]
    listed = ", ".join(f"{b} ({s})" for b, s in zip(missing[:20], states[:20]))
    more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
    raise IncompleteRunError(
        f"run {run.path} is not fully trained: {len(missing)} of {run.num_blocks} block(s) "
        f"not done: {listed}{more}; train them first (psm train with this run's config)"
    )


def check_out(out: Path) -> None:
    """Refuse an output that exists, is not ``*.safetensors``, or whose folder is missing."""
    if out.suffix != SUFFIX:
        raise PSMError(f"{out}: an exported model is a {SUFFIX} file (name it e.g. model{SUFFIX})")
    if out.exists() or out.is_symlink():
        raise PSMError(f"{out} exists; refusing to overwrite it (choose another name)")
    if not out.parent.is_dir():
        raise PSMError(f"{out}: folder {out.parent} does not exist")


def prepared_options(config: RunConfig) -> dict[str, Any]:
    """How a run's prepared image directory was made from image files (``size``,
    ``channels``, ...: ``meta.json``'s ``provenance.options``); empty for other data."""
    path = getattr(config.data, "path", None)
    if not isinstance(config.data, ImageData) or path is None:
        return {}
    options = read_meta(path).get("provenance", {}).get("options", {})
    return dict(options) if isinstance(options, dict) else {}


def data_map(
    dataset: Dataset, config: RunConfig | None = None
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """What an export keeps of the data map: ``(metadata, tensors)``.

    Images (:class:`~psm.data.images.ImageDataset`): levels, scale, centring, flips and
    dequantization, the options the image files were prepared with (``prepared``: ``size``,
    ``channels``, ...; :func:`prepared_options`) and the training mean ``data.train_mean``; the
    user's points (:class:`~psm.data.points.PointsDataset`): ``data.shift`` (zeros without
    ``data.center``); any other dataset is rebuilt from the config when loaded
    (``kind: config``).
    """
    shape = [int(s) for s in dataset.shape]
    if isinstance(dataset, ImageDataset):
        meta = {
            "kind": "image", "name": dataset.name, "shape": shape, "levels": dataset.levels,
            "scale": dataset.scale, "center": dataset.center, "flip": dataset.flip,
            "dequantize": dataset.dequantize,
            "prepared": prepared_options(config) if config is not None else {},
        }  # fmt: skip
        mean = np.asarray(dataset.arrays.train_mean, dtype=np.float64)
        return meta, {"data.train_mean": torch.from_numpy(mean.copy())}
    if isinstance(dataset, PointsDataset):
        meta = {"kind": "points", "name": dataset.name, "shape": shape}
        return meta, {"data.shift": dataset.shift.to(torch.float64).clone()}
    return {"kind": "config", "name": dataset.name, "shape": shape}, {}


def export_run(run: str | Path | Run, out: str | Path) -> Path:
    """Write a finished run as one safetensors file (module docstring), atomically.

    Args:
        run: a run directory or an open :class:`~psm.runs.run.Run`.
        out: the file to write (``*.safetensors``; must not exist).

    Returns:
        The path written.

    Raises:
        PSMError: an existing or misnamed output, or a missing folder.
        IncompleteRunError: some blocks are missing or unfinished.
        DataError: a data file changed since the run was created (the map would be wrong).
        CheckpointError: a block's weights file is unreadable or foreign.
    """
    from .. import __version__
    from .checkpoint import load_weights

    out = Path(out)
    check_out(out)
    r = run if isinstance(run, Run) else Run.open(run)
    require_done(r)
    r.check_data()
    tensors: dict[str, Tensor] = {}
    blocks = []
    for b in range(r.num_blocks):
        net = r.parts.new_net(b)
        load_weights(r, b, net)  # checked: hash, block id, names and shapes
        for name, value in net.state_dict().items():
            tensors[f"{BLOCK_PREFIX}{b}.{name}"] = value.detach().cpu().contiguous().clone()
        st = r.ledger.status(b)
        blocks.append(
            {"step": st.step, "target": st.target, "wall_time": st.wall_time,
             "last_loss": st.last_loss}
        )  # fmt: skip
    map_meta, map_tensors = data_map(r.dataset, r.config)
    tensors |= map_tensors
    manifest = read_manifest(r.layout.data) or data_manifest(r.config, r.dataset)
    p = r.partition
    meta = {
        "format": FORMAT,
        "psm_version": __version__,
        "config": json.dumps(r.config.model_dump(mode="json"), sort_keys=True),
        "config_hash": r.hash,
        "hash_scheme": "psm-0.1" if r.legacy_hash else "psm",
        "data": json.dumps(manifest, sort_keys=True),
        "partition": json.dumps(
            {"kind": p.kind, "edges": list(p.edges), "t0": p.t0, "blocks": p.num_blocks}
        ),
        "shape": json.dumps(list(r.shape)),
        "data_map": json.dumps(map_meta, sort_keys=True),
        "blocks": json.dumps(blocks),
        "weights": "ema" if r.config.train.ema is not None else "final",
        "run": str(r.path.resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_new(out, tensors, meta)
    return out


def _write_new(out: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    """Write a temp file beside ``out``, fsync it, then link it into place: never over an
    existing file, never a torn one."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, out)  # fails if out appeared meanwhile
        except FileExistsError:
            raise PSMError(f"{out} exists; refusing to overwrite it") from None
        except OSError:  # no hard links here: the check above is the guard
            if out.exists():
                raise PSMError(f"{out} exists; refusing to overwrite it") from None
            os.replace(tmp, out)
            tmp = None
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# ---------------------------------------------------------------------------- reading
class ImageMap(ImageDataset):
    """An exported image model's data map without its images: :meth:`unit_to_model`,
    :meth:`to_unit`, :meth:`levels_to_unit` and :meth:`bits_per_dim` exactly as in training
    (from the stored levels, scale and training mean); drawing points is refused."""

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        raise DataError(f"the exported {self.name} model holds no images to train on")

    def test_set(self, n: int, seed: int = 12345, dequantize: bool | None = None) -> Tensor:
        raise DataError(
            f"the exported {self.name} model holds no test images: psm nll needs the data it "
            "was trained on; psm score MODEL INPUT scores your own images"
        )


class PointsMap(PointsDataset):
    """An exported points model's data map without its points: ``y = x - shift``, a
    :class:`~psm.data.points.PointsDataset` (so code that maps points by ``dataset.shift``
    treats both alike) whose train and test parts are empty and refused.

    Attributes:
        shift: the training mean subtracted in training (float64 ``[d]``; zeros without
            ``data.center``).
    """

    def __init__(self, name: str, shift: Tensor) -> None:  # no file: nothing to read
        d = int(shift.numel())
        self.path = Path()
        self.name = name
        self.shape = (d,)
        self.shift = shift.to(torch.float64).reshape(d)
        self._train = torch.zeros(0, d)
        self._test = torch.zeros(0, d)
        self._cache = {}

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        raise DataError("the exported points model holds no points to train on")

    def test_set(self, n: int, seed: int = 12345, dequantize: bool | None = None) -> Tensor:
        raise DataError(
            "the exported points model holds no test points: psm nll needs the points file it "
            "was trained on; psm score MODEL INPUT scores your own points"
        )


class StoredLedger:
    """The block statuses an export recorded (all done): what ``psm status``-like readers and
    :func:`~psm.runs.nll_records.nll_record` ask of a run's ledger."""

    def __init__(self, records: list[dict[str, Any]], partition) -> None:
        self._records = records
        self.partition = partition

    @property
    def num_blocks(self) -> int:
        return len(self._records)

    def status(self, block: int) -> BlockStatus:
        rec = self._records[block]
        return BlockStatus(
            block=block, span=self.partition.describe(block), state="done",
            step=int(rec.get("step", 0)), target=int(rec.get("target", 0)),
            last_loss=rec.get("last_loss"), wall_time=float(rec.get("wall_time", 0.0)),
            checkpoint_step=None, checkpoint_time=None, error=None, updated=None,
        )  # fmt: skip

    def statuses(self, blocks: list[int] | None = None) -> list[BlockStatus]:
        ids = range(self.num_blocks) if blocks is None else blocks
        return [self.status(b) for b in ids]

    def not_done(self, blocks: list[int] | None = None, **_: Any) -> list[int]:
        return []


@dataclass
class ExportFile:
    """An exported model's checked metadata (no tensors read yet).

    Attributes:
        path: the file.
        config: the run's config.
        hash: its config hash.
        legacy_hash: the hash is psm 0.1's.
        meta: the raw metadata.
        manifest: the data manifest (shape, data files and their sha256).
        map_meta: the data map's description (``kind``: image, points or config).
        blocks: each block's recorded status.
        parts: the run's parts built from the config (process, partition, nets).
    """

    path: Path
    config: RunConfig
    hash: str
    legacy_hash: bool
    meta: dict[str, str]
    manifest: dict[str, Any]
    map_meta: dict[str, Any]
    blocks: list[dict[str, Any]]
    parts: Parts

    @property
    def shape(self) -> tuple[int, ...]:
        return self.parts.shape

    @cached_property
    def ledger(self) -> StoredLedger:
        return StoredLedger(self.blocks, self.parts.partition)

    @cached_property
    def dataset(self) -> Dataset:
        """The data map (see :func:`data_map`): an :class:`ImageMap`, a :class:`PointsMap`, or
        the dataset rebuilt from the config (toys, mixtures: no files)."""
        kind = self.map_meta.get("kind")
        if kind == "image":
            mean = self._map_tensor("data.train_mean", self.shape).numpy()
            empty = np.zeros((0, *self.shape), dtype=np.uint8)
            m = self.map_meta
            arrays = ImageArrays(str(m["name"]), int(m["levels"]), empty, empty, mean)
            return ImageMap(
                arrays, center=bool(m["center"]), scale=float(m["scale"]), flip=bool(m["flip"]),
                dequantize=bool(m["dequantize"]),
            )  # fmt: skip
        if kind == "points":
            return PointsMap(str(self.map_meta["name"]), self._map_tensor("data.shift", self.shape))
        return self.test_dataset()  # toys and mixtures: no files

    def _map_tensor(self, key: str, shape: tuple[int, ...]) -> Tensor:
        try:
            with safe_open(str(self.path), framework="pt") as f:
                if key not in f.keys():  # noqa: SIM118
                    raise ExportError(f"{self.path}: exported model lacks its data map ({key})")
                t = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise ExportError(f"{self.path}: unreadable exported model ({_line(e)})") from None
        if tuple(t.shape) != tuple(shape) or not t.is_floating_point():
            raise ExportError(
                f"{self.path}: {key} has shape {list(t.shape)} {t.dtype}, expected {list(shape)}"
            )
        return t.to(torch.float64)

    def test_dataset(self) -> Dataset:
        """The dataset with its test split, rebuilt from the config: directly for data without
        files (toys, mixtures, the bundled digits), else from the recorded data files when they
        are here with the recorded content.

        Raises:
            DataError: the data files are not here or changed (one line, pointing to
                ``psm score``).
        """
        try:
            check_data(self.manifest, self.path)
        except DataError as e:
            raise DataError(
                f"this needs the test data of {self.path}, which is not here ({_line(e)}); "
                f"psm score {self.path} INPUT scores your own data"
            ) from None
        return self.parts.dataset


def _line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _json(meta: dict[str, str], key: str, path: Path) -> Any:
    if key not in meta:
        raise ExportError(f"{path}: exported model has no {key!r} metadata (damaged)")
    try:
        return json.loads(meta[key])
    except ValueError:
        raise ExportError(f"{path}: exported model's {key!r} metadata is not JSON") from None


def read_export(path: str | Path) -> ExportFile:
    """Open an exported model and check its metadata (the tensors are read by
    :func:`load_blocks`).

    Raises:
        RunError: no such file.
        ExportError: not a safetensors file, not a psm export, or metadata that contradict
            each other (a config that no longer matches its hash, another partition or shape).
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"exported model {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ExportError(
            f"{path} is not a readable safetensors file (truncated or not one: {_line(e)})"
        ) from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path} is not a psm exported model (made by psm export)")
    raw = _json(meta, "config", path)
    if not isinstance(raw, dict):
        raise ExportError(f"{path}: exported model's config is not a mapping")
    legacy = meta.get("hash_scheme") == "psm-0.1"
    try:
        config = validate_config(_known_executor(raw), f"{path} (config)")
    except PSMError as e:
        raise ExportError(f"{path}: exported config does not load: {_line(e)}") from None
    got = legacy_config_hash(config) if legacy else config_hash(config)
    if got != meta.get("config_hash"):
        raise ExportError(
            f"{path}: the exported config does not match its config_hash (edited or damaged)"
        )
    shape = _json(meta, "shape", path)
    map_meta = _json(meta, "data_map", path)
    blocks = _json(meta, "blocks", path)
    manifest = _json(meta, "data", path)
    part = _json(meta, "partition", path)
    if not (isinstance(shape, list) and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ExportError(f"{path}: exported shape {shape!r} is not a list of sizes")
    parts = Parts(config, shape=tuple(shape))
    p = parts.partition
    if not isinstance(part, dict) or (
        part.get("kind") != p.kind
        or part.get("blocks") != p.num_blocks
        or not _close(part.get("edges"), list(p.edges))
        or not _close([part.get("t0")], [p.t0])
    ):
        raise ExportError(f"{path}: the exported partition does not match its config")
    if not isinstance(blocks, list) or len(blocks) != p.num_blocks:
        raise ExportError(f"{path}: exported block records do not match its {p.num_blocks} blocks")
    if not isinstance(map_meta, dict) or not isinstance(manifest, dict):
        raise ExportError(f"{path}: exported data map or data manifest is malformed")
    return ExportFile(
        path, config, str(meta["config_hash"]), legacy, meta, manifest, map_meta,
        [b if isinstance(b, dict) else {} for b in blocks], parts,
    )  # fmt: skip


def _close(a: Any, b: list[float]) -> bool:
    if not isinstance(a, list) or len(a) != len(b):
        return False
    try:
        return all(math.isclose(float(x), y, rel_tol=0, abs_tol=1e-12) for x, y in zip(a, b))
    except (TypeError, ValueError):
        return False


def load_blocks(export: ExportFile) -> list[nn.Module]:
    """Every block's net, built from the config and loaded from the file (CPU, float32 or as
    built; eval mode).

    Raises:
        ExportError: a block's tensor missing, unexpected, or of another shape; a tensor that
            is not a weight of any block; an unreadable file.
    """
    path = export.path
    k = export.parts.partition.num_blocks
    nets = [export.parts.new_net(b) for b in range(k)]
    wanted = [net.state_dict() for net in nets]
    got: list[dict[str, Tensor]] = [{} for _ in range(k)]
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                if key in MAP_TENSORS:
                    continue
                b, name = _block_key(key)
                if b is None or not 0 <= b < k or name not in wanted[b]:
                    raise ExportError(
                        f"{path}: unexpected tensor {key!r} (not a weight of this model's "
                        f"{k} block(s) of net {export.config.net.name})"
                    )
                got[b][name] = f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise ExportError(f"{path}: unreadable exported model ({_line(e)})") from None
    for b, (net, want, have) in enumerate(zip(nets, wanted, got)):
        missing = [n for n in want if n not in have]
        if missing:
            raise ExportError(
                f"{path}: block {b} lacks {len(missing)} tensor(s) (first: "
                f"{BLOCK_PREFIX}{b}.{missing[0]}); the file is damaged or not this model's"
            )
        bad = [n for n in want if tuple(have[n].shape) != tuple(want[n].shape)]
        if bad:
            n = bad[0]
            raise ExportError(
                f"{path}: {BLOCK_PREFIX}{b}.{n} has shape {list(have[n].shape)}, the configured "
                f"net needs {list(want[n].shape)}"
            )
        net.load_state_dict(have)
        net.eval().requires_grad_(False)
    return nets


def _block_key(key: str) -> tuple[int | None, str]:
    """``"block.3.layers.0.weight"`` -> ``(3, "layers.0.weight")``; ``(None, key)`` otherwise."""
    if not key.startswith(BLOCK_PREFIX):
        return None, key
    head, _, name = key[len(BLOCK_PREFIX) :].partition(".")
    if not head.isdigit() or not name:
        return None, key
    return int(head), name


__all__ = [
    "FORMAT", "ExportError", "ExportFile", "ImageMap", "PointsMap", "StoredLedger", "data_map",
    "export_run", "load_blocks", "prepared_options", "read_export", "require_done",
]  # fmt: skip
