"""A trained run as a model: the bridge between the run directory and the math.

:mod:`psm.core.model`, :mod:`psm.core.ode`, :mod:`psm.core.sample` and
:mod:`psm.core.likelihood` know nothing of files; this module loads a run's blocks into a
:class:`~psm.core.model.BlockModel` (refusing missing or unfinished blocks), from a run
directory or from a file written by ``psm export`` (:mod:`psm.runs.export`) alike
(:func:`open_source`, :func:`open_model`), maps the user's data to the model's space
(:meth:`ModelSource.to_model`), and scores a run on its test set: the NLL in nats, and for
image data bits/dim in one of two conventions (:data:`CONVENTIONS`):

* ``"psm"`` (the headline): test images dequantized, ``x = (k + u) / L``, mapped to the model's
  ``y = s (x - m)`` exactly as in training; ``bpd = (NLL - D log s) / (D ln 2) + log2 L``
  (:meth:`~psm.data.images.ImageDataset.bits_per_dim`), an upper bound on the discrete
  negative log-likelihood of the levels ``k``. Likelihood from the run's ``t0``, with the
  run's ``eval`` solver, Hutchinson probes held fixed through each solve.
* ``"authors"``: what the authors' scripts compute, ``log2 L - log p / (D ln 2)`` (8 - ... for
  256 levels) on ``k / (L - 1)`` minus the training mean (no dequantization, so not a bound),
  starting the likelihood at ``t0 = 0.001`` (:data:`AUTHORS_T0`), with ``1000 // K`` RK4 steps
  per block and a Hutchinson probe redrawn at every function evaluation. The same
  log-Jacobian of psm's scale is added back, so the number is the authors' for their own data
  map whatever ``data.scale`` the run used.

The psm convention dequantizes in one of two ways (:data:`~psm.data.dequantize.DEQUANTIZATIONS`,
:mod:`psm.data.dequantize`), named in every bits/dim output (``dequantization``):

* ``"uniform"`` (the default; the figures above): ``x = (k + u) / L``.
* ``"truncated-normal"`` (i-DODE's training-free dequantization, an evaluation option): the
  level's bin centre plus ``δ = (σ_t0/α_t0) η`` per dimension, ``η`` a standard normal cut to the
  bin, so the point the ODE starts from at ``t0`` carries the model's own noise at ``t0``; then
  ``bpd = (NLL + log q(δ)) / (D ln 2)`` per image (``q`` the truncated normal's density in the
  model's space; its bins have width ``s/L``), also an upper bound on the discrete NLL. As for
  uniform noise, psm starts the ODE at ``t0`` from the dequantized point itself; i-DODE's code
  starts from ``α_t0`` times it (``α x + σ η``) and so scores ``α_t0^D p_t0(α_t0 y)``, a
  different reading of the same model at ``t0`` (VP ``b(t) = 10 t`` at ``t0 = 1e-3``:
  ``1 - α_t0 = 2.5e-6``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..core.likelihood import (
    NLLResult,
    ProbeRedraw,
    TraceMethod,
    auto_trace,
    evaluate_nll,
)
from ..core.model import BlockModel, GridField
from ..core.ode import SolverSettings
from ..core.partition import Partition, PartitionError
from ..core.reparam import as_prediction
from ..data.base import Dataset, ExactDensity, Quantized
from ..data.dequantize import (
    TRUNCATED_NORMAL,
    UNIFORM,
    Dequantization,
    TruncatedNormal,
    dequantization_name,
    noise_to_signal,
)
from ..data.images import ImageDataset
from ..data.points import PointsDataset
from ..errors import IncompleteRunError, PSMError, RunError
from ..progress import progress_bar
from .checkpoint import load_weights
from .config import RunConfig
from .export import ExportFile, load_blocks, prepared_options, read_export, require_done
from .run import Run
from .run_parts import Parts

Convention = Literal["psm", "authors"]
CONVENTIONS: tuple[str, ...] = ("psm", "authors")
AUTHORS_T0 = 1e-3
"""Where the authors' scripts start the likelihood integral."""
AUTHORS_STEPS = 1000
"""The authors' scripts take ``AUTHORS_STEPS // K`` RK4 steps in each of K blocks."""


class ModelSource:
    """A trained model before its weights are loaded: a run directory or an exported file.

    Everything the commands and the Python API ask of "the run" without its weights: the
    config and hash, the process, partition and shape, the block statuses (``ledger``), the
    data map (``dataset``) and the test set (:meth:`test_data`). Build one with
    :func:`open_source`; :meth:`load` loads the weights.

    Attributes:
        path: the run directory or the exported file.
        run: the :class:`~psm.runs.run.Run` (None for an exported file).
        export: the :class:`~psm.runs.export.ExportFile` (None for a run directory).
    """

    def __init__(
        self, path: Path, *, run: Run | None = None, export: ExportFile | None = None
    ) -> None:
        if (run is None) == (export is None):
            raise ValueError("a model source is a run or an exported file")
        self.path = path
        self.run = run
        self.export = export

    def __repr__(self) -> str:
        kind = "exported model" if self.is_export else "run"
        return f"ModelSource({kind} {str(self.path)!r}, {self.config.name}, {self.hash})"

    @property
    def is_export(self) -> bool:
        """Whether this is an exported file (no run directory)."""
        return self.export is not None

    @property
    def _owner(self) -> Run | ExportFile:
        return self.run if self.run is not None else self.export  # type: ignore[return-value]

    @property
    def config(self) -> RunConfig:
        return self._owner.config

    @property
    def hash(self) -> str:
        """The config hash (what every block was trained under)."""
        return self._owner.hash

    @property
    def parts(self) -> Parts:
        return self._owner.parts

    @property
    def partition(self) -> Partition:
        return self.parts.partition

    @property
    def process(self):
        return self.parts.process

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one point in the model's space."""
        return self._owner.shape

    @property
    def num_blocks(self) -> int:
        return self.partition.num_blocks

    @property
    def ledger(self):
        """The block statuses: the run's ledger, or those an export recorded (all done)."""
        return self._owner.ledger

    @property
    def dataset(self) -> Dataset:
        """The data map from the user's coordinates to the model's space and back: the run's
        dataset, or for an export an :class:`~psm.runs.export.ImageMap` /
        :class:`~psm.runs.export.PointsMap` carrying the training map without the data (toys:
        the dataset rebuilt from the config). Use :meth:`test_data` for a test set."""
        return self._owner.dataset

    @property
    def prepared_options(self) -> dict[str, Any]:
        """How the run's image files were prepared (``size``, ``channels``, ...: the prepared
        directory's ``provenance.options``, kept in an export); empty for other data. Needed
        to map a user's image files (resize, crop) exactly as the training images were."""
        if self.export is not None:
            options = self.export.map_meta.get("prepared") or {}
            return dict(options) if isinstance(options, dict) else {}
        return prepared_options(self.config)

    def check_data(self) -> None:
        """A run: refuse data files that changed since it was created. An export carries its
        map and needs no data: nothing to check."""
        if self.run is not None:
            self.run.check_data()

    def test_data(self) -> Dataset:
        """The dataset with its test split (for the NLL), its files checked.

        Raises:
            DataError: a data file changed or is gone; for an export, one line saying that the
                test set needs the data and that ``psm score`` scores the user's own inputs.
        """
        if self.run is not None:
            self.run.check_data()
            return self.run.dataset
        assert self.export is not None
        return self.export.test_dataset()

    def load(
        self,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        grid_field: GridField = "constant",
        t0: float | None = None,
        blocks: list[int] | None = None,
    ) -> BlockModel:
        """Build the nets and load every block's final weights (the EMA ones when the run
        kept an EMA); see :func:`load_model`. ``blocks``: load only these (of a run; they must
        be done), the others stand in as :class:`NotLoaded` blocks that refuse to be evaluated
        (for per-block measurements such as ``psm kl --blocks``)."""
        if self.run is not None:
            r = self.run
            if blocks is None:
                require_done(r)
            else:
                missing = [b for b in blocks if not 0 <= b < r.num_blocks or not r.ledger.done(b)]
                if missing:
                    raise IncompleteRunError(
                        f"run {r.path}: block(s) {', '.join(map(str, missing))} not done (or "
                        f"not in its {r.num_blocks} blocks)"
                    )
            nets = []
            for b in range(r.num_blocks):
                if blocks is not None and b not in blocks:
                    nets.append(NotLoaded(b))
                    continue
                net = r.parts.new_net(b)
                load_weights(r, b, net)
                nets.append(net)
            parts = r.parts
        else:
            assert self.export is not None
            nets = load_blocks(self.export)
            parts = self.export.parts
        for net in nets:
            net.to(device=device, dtype=dtype).eval()
            net.requires_grad_(False)
        # a block trained to predict something else than the process is read as the process's
        nets = [
            net if isinstance(net, NotLoaded)
            else as_prediction(net, parts.process.with_prediction(parts.prediction(b)),
                               self.process)
            for b, net in enumerate(nets)
        ]  # fmt: skip
        model = BlockModel(
            self.process, self.partition, nets, grid_field=grid_field, shape=self.shape
        )
        return model if t0 is None else with_t0(model, t0)

    # ------------------------------------------------------------------ the data map
    def to_model(
        self, x, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, float]:
        """Map points in the data's coordinates to the model's space, exactly as in training.

        * images: ``uint8`` levels ``k`` ``[N, C, H, W]`` become ``x = (k + u) / L`` (``u``
          from ``generator``, one draw for the whole input, as ``psm nll`` draws its test
          set's), and float pixels ``x`` in ``[0, 1]`` are taken as they are; then
          ``y = s (x - m)`` with the dequantized convention's ``m`` (the psm convention of
          ``psm nll``, whatever ``data.dequantize`` the run trained with; truncated-normal
          noise instead: :meth:`dequantize_truncated_normal`);
        * the user's points (``data: points``): ``y = x - shift`` (the training mean when
          ``data.center``; the raw file's coordinates in);
        * toys and other data: the dataset's own coordinates are the model's (``y = x``).

        Args:
            x: ``[N, *shape]`` (tensor or array).
            generator: dequantization noise for ``uint8`` images (default: a fresh one).
            dtype: the float dtype of ``y``.

        Returns:
            ``(y [N, *shape], log_det)``: ``log_det`` is ``log |dy/dx|`` per point (``D log s``
            for images, 0 otherwise), so ``log p_x(x) = log p_y(y) + log_det``.

        Raises:
            PSMError: a shape other than ``[N, *shape]``, or image levels outside ``0..L-1``.
        """
        ds = self.dataset
        x = torch.as_tensor(x)
        if x.ndim != len(self.shape) + 1 or tuple(x.shape[1:]) != self.shape:
            want = ", ".join(map(str, self.shape))
            raise PSMError(f"expected points of shape [N, {want}], got {list(x.shape)}")
        if isinstance(ds, ImageDataset):
            if x.dtype == torch.uint8:
                if x.numel() and int(x.max()) >= ds.levels:
                    raise PSMError(
                        f"image levels must lie in 0..{ds.levels - 1}, got up to {int(x.max())}"
                    )
                g = generator or torch.Generator(device=x.device).manual_seed(0)
                u = ds.levels_to_unit(x, g)
            elif x.is_floating_point():
                u = x.to(torch.float32, copy=True)
            else:
                raise PSMError(f"images are uint8 levels or floats in [0, 1], not {x.dtype}")
            y = ds.unit_to_model(u, True).to(dtype)
            return y, math.prod(self.shape) * ds.log_scale_per_dim
        if not (x.is_floating_point() or x.dtype in _INT_DTYPES):
            raise PSMError(f"points must be numbers, not {x.dtype}")
        if isinstance(ds, PointsDataset):  # an export's PointsMap too
            return (x.to(torch.float64) - ds.shift.to(x.device)).to(dtype), 0.0
        return x.to(dtype), 0.0

    def truncated_normal(self, t0: float | None = None) -> TruncatedNormal:
        """The truncated-normal dequantization of this image model at ``t0`` (default: the
        run's floor): ``δ = (σ_t0/α_t0) η`` cut to half a bin, ``s / (2L)`` (module docstring).

        Raises:
            PSMError: data without levels.
        """
        ds = self.dataset
        if not isinstance(ds, ImageDataset):
            raise PSMError(
                f"truncated-normal dequantization is for image data; {self.config.data.name} "
                "has no levels"
            )
        return truncated_normal_for(self.process, self.partition.t0 if t0 is None else t0, ds)

    def dequantize_truncated_normal(
        self,
        k,
        *,
        t0: float | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor]:
        """Image levels to the model's space with truncated-normal noise (the evaluation
        option of :mod:`psm.data.dequantize`), as :meth:`to_model` does with uniform noise.

        Args:
            k: ``uint8`` levels ``[N, C, H, W]`` (floats have no bins to dequantize in).
            t0: where the ODE starts (default: the run's floor); the noise is ``σ_t0/α_t0``.
            generator: the noise (default: a fresh one seeded 0); one draw for the whole input.
            dtype: the float dtype of ``y``.

        Returns:
            ``(y [N, C, H, W], log_q [N])``: ``log_q`` float64 is the noise's log-density in the
            model's space, so ``bpd = (-log p(y) + log_q) / (D ln 2)`` per image.

        Raises:
            PSMError: data without levels, a shape other than ``[N, *shape]``, not ``uint8``, or
                levels outside ``0..L-1``.
        """
        q = self.truncated_normal(t0)
        ds = self.dataset
        assert isinstance(ds, ImageDataset)
        k = torch.as_tensor(k)
        if k.ndim != len(self.shape) + 1 or tuple(k.shape[1:]) != self.shape:
            want = ", ".join(map(str, self.shape))
            raise PSMError(f"expected images of shape [N, {want}], got {list(k.shape)}")
        if k.dtype != torch.uint8:
            raise PSMError(f"truncated-normal dequantization takes uint8 levels, not {k.dtype}")
        if k.numel() and int(k.max()) >= ds.levels:
            raise PSMError(f"image levels must lie in 0..{ds.levels - 1}, got up to {int(k.max())}")
        g = generator or torch.Generator(device=k.device).manual_seed(0)
        return truncated_normal_levels(ds, q, k, g, dtype)

    def from_model(self, y: Tensor) -> Tensor:
        """The inverse of :meth:`to_model`: model-space points to the data's coordinates
        (images: pixels ``x = y / s + m`` clipped to ``[0, 1]``; points: ``y + shift``)."""
        ds = self.dataset
        if isinstance(ds, ImageDataset):
            return ds.to_unit(y)  # the training convention's map back, as psm sample's grids
        if isinstance(ds, PointsDataset):
            return (y.to(torch.float64) + ds.shift.to(y.device)).to(y.dtype)
        return y


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def truncated_normal_for(process, t0: float, dataset: ImageDataset) -> TruncatedNormal:
    """The truncated-normal dequantization of ``dataset`` for a model on ``process`` whose ODE
    starts at ``t0``: noise ``σ_t0/α_t0`` in the model's units, cut to ``s / (2L)``."""
    return TruncatedNormal(noise_to_signal(process, t0), dataset.half_bin_width)


def truncated_normal_levels(
    dataset: ImageDataset,
    q: TruncatedNormal,
    k: Tensor,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Levels ``k [N, C, H, W]`` to ``y = c_k + δ`` (bin centres plus ``δ ~ q``, one draw
    from ``generator`` for the whole set; float64 sums, then ``dtype``) and ``log q(δ) [N]``
    float64 on the CPU."""
    delta = q.sample(tuple(k.shape), generator).to(k.device)
    y = dataset.bin_centres(k).add_(delta)
    return y.to(dtype), q.log_prob(delta).cpu()


def open_source(source: str | Path | Run | ModelSource | OpenedModel) -> ModelSource:
    """A :class:`ModelSource` for a run directory, an open run, or an exported
    ``.safetensors`` file (told apart by being a file); nothing is loaded but metadata.

    Raises:
        RunError: no such directory or file, or a directory that is not a run.
        ExportError: a file that is not a psm export, or damaged metadata (one line).
    """
    if isinstance(source, ModelSource):
        return source
    if isinstance(source, OpenedModel):
        return source.source
    if isinstance(source, Run):
        return ModelSource(source.path, run=source)
    path = Path(source)
    if path.is_file():
        return ModelSource(path, export=read_export(path))
    if not path.exists() and path.suffix == ".safetensors":
        raise RunError(f"exported model {path} does not exist")
    return ModelSource(path, run=Run.open(path))


@dataclass(frozen=True)
class OpenedModel:
    """A trained model with its weights loaded, and everything needed to use it.

    Attributes:
        model: the blocks as one :class:`~psm.core.model.BlockModel` (eval mode, no grads).
        source: where it came from (:class:`ModelSource`: config, hash, data map, test set).
        device: where the nets live.
        dtype: the nets' dtype.
    """

    model: BlockModel
    source: ModelSource
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self) -> RunConfig:
        """The run's config."""
        return self.source.config

    @property
    def hash(self) -> str:
        return self.source.hash

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    @property
    def dataset(self) -> Dataset:
        """The data map (:attr:`ModelSource.dataset`); use ``source.test_data()`` for the test
        set."""
        return self.source.dataset

    @property
    def is_export(self) -> bool:
        return self.source.is_export


def open_model(
    source: str | Path | Run | ModelSource,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    grid_field: GridField = "constant",
    t0: float | None = None,
) -> OpenedModel:
    """Open a trained model from a run directory or an exported file, weights loaded.

    The one entry point of ``psm nll``, ``psm sample``, ``psm score``, ``psm compare`` and
    :func:`psm.load`. ``result.model`` is the :class:`~psm.core.model.BlockModel`,
    ``result.config`` the :class:`~psm.runs.config.RunConfig`, ``result.dataset`` the data map
    (:meth:`ModelSource.to_model` / :meth:`ModelSource.from_model` map the user's points or
    images to the model's space exactly as in training, with the log-Jacobian),
    ``result.source.test_data()`` the dataset with its test split (refused in one line for an
    export whose data files are not here), and ``result.source`` the run-like rest (``hash``,
    ``partition``, ``ledger``, ``run`` or ``export``).

    Args:
        source: a run directory, an open :class:`~psm.runs.run.Run`, a :class:`ModelSource`,
            or an exported ``.safetensors`` file (``psm export``), told apart by being a file.
        device: where the nets live.
        dtype: the nets' dtype (float64 for reference integrations).
        grid_field: DPSM field, ``"constant"`` (paper) or ``"linear"``.
        t0: integrate from this time instead of the run's ``partition.t0`` (:func:`with_t0`).

    Raises:
        RunError: no such run or file.
        IncompleteRunError: a run with missing or unfinished blocks (named in the message); no
            block is ever replaced by an untrained network.
        CheckpointError: a block's weights file is unreadable or foreign; an exported file that
            is not a psm export, or lacks a block's tensor, or holds one of another shape
            (:class:`~psm.runs.export.ExportError`).
    """
    src = open_source(source)
    dev = torch.device(device)
    model = src.load(device=dev, dtype=dtype, grid_field=grid_field, t0=t0)
    return OpenedModel(model, src, dev, dtype)


def load_model(
    run: str | Path | Run | ModelSource,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    grid_field: GridField = "constant",
    t0: float | None = None,
    blocks: list[int] | None = None,
) -> BlockModel:
    """Build a run's nets from its config and load every block's final weights (``blocks``:
    only these, see :meth:`ModelSource.load`).

    Args:
        run: a run directory, an open :class:`~psm.runs.run.Run`, or an exported
            ``.safetensors`` file (see :func:`open_model`).
        device: where the nets live.
        dtype: the nets' dtype (float64 for reference integrations).
        grid_field: DPSM field, ``"constant"`` (paper) or ``"linear"``.
        t0: integrate from this time instead of the run's ``partition.t0``
            (:func:`with_t0`).

    Returns:
        A :class:`BlockModel` whose blocks are the nets, in eval mode with gradients off. The
        weights are each block's final ones: the EMA of its parameters when the run trained
        with ``train.ema`` (the trainer writes those as the final weights).

    Raises:
        IncompleteRunError: some blocks are missing or unfinished (named in the message); no
            block is ever replaced by an untrained network. Blocks may be done at different
            step counts (each at its own target).
        CheckpointError: a weights file is unreadable or belongs to another config; an
            exported file that does not match its config.
    """
    return open_source(run).load(
        device=device, dtype=dtype, grid_field=grid_field, t0=t0, blocks=blocks
    )


class NotLoaded(torch.nn.Module):
    """A block left out of a partial load: evaluating it is an error, never a random net."""

    def __init__(self, block: int) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        raise IncompleteRunError(f"block {self.block} was not loaded (not asked for, or not done)")


def with_t0(model: BlockModel, t0: float) -> BlockModel:
    """The same blocks integrated from another time floor ``t0``.

    Raises:
        PSMError: the partition cannot take that floor (e.g. block 0 would lie below it).
    """
    if t0 == model.t0:
        return model
    try:
        partition = dataclasses.replace(model.partition, t0=t0)
    except PartitionError as e:
        raise PSMError(f"t0 {t0:g}: {e}") from None
    return BlockModel(
        model.process, partition, model.blocks, grid_field=model.grid_field, shape=model.shape
    )


@dataclass(frozen=True)
class BitsPerDim:
    """A bits/dim figure of image data, with what it means.

    Attributes:
        bpd: mean bits/dim over the test images.
        stderr: its standard error (``stderr`` of the NLL over ``D ln 2``).
        trivial: ``log2 L``, the bits/dim of the uniform distribution over the levels (any
            model worth keeping is below it).
        levels: L.
        dims: D = C H W.
        log_scale_per_dim: the data map's log-Jacobian per dimension (``log s``), added back.
        convention: ``"psm"`` (dequantized) or ``"authors"``.
        values: per-image bits/dim ``[n]`` (float64, CPU).
        dequantization: the psm convention's ``"uniform"`` or ``"truncated-normal"`` (None for
            the authors', not dequantized).
        noise_scale: truncated-normal: ``σ_t0/α_t0`` in the model's units (None otherwise).
        log_q: truncated-normal: the noise's log-density per image ``[n]`` (float64, nats, the
            model's space; ``values = (NLL + log_q) / (D ln 2)``); None otherwise.
    """

    bpd: float
    stderr: float
    trivial: float
    levels: int
    dims: int
    log_scale_per_dim: float
    convention: str
    values: Tensor = dataclasses.field(repr=False)
    dequantization: str | None = UNIFORM
    noise_scale: float | None = None
    log_q: Tensor | None = dataclasses.field(default=None, repr=False)


def is_image_data(dataset: Dataset) -> bool:
    """Whether a dataset has discrete levels and a bits/dim formula (image data): a
    :class:`~psm.data.base.Quantized`."""
    return isinstance(dataset, Quantized)


def bits_per_dim(
    result: NLLResult,
    dataset: Quantized,
    convention: Convention = "psm",
    *,
    log_q: Tensor | None = None,
    noise_scale: float | None = None,
) -> BitsPerDim:
    """Bits/dim of an NLL result per image, then averaged: through the dataset's own formula
    (:meth:`~psm.data.images.ImageDataset.bits_per_dim`, uniform dequantization or the
    authors' convention), or, given the truncated-normal noise's ``log_q [n]``,
    ``(NLL + log_q) / (D ln 2)`` (:mod:`psm.data.dequantize`)."""
    dims = math.prod(dataset.shape)
    if log_q is None:
        values = dataset.bits_per_dim(result.values)
        dequantization = UNIFORM if convention == "psm" else None
    else:
        if convention != "psm":
            raise PSMError("truncated-normal dequantization applies to the psm convention")
        log_q = log_q.to(torch.float64).cpu()
        values = (result.values + log_q) / (dims * math.log(2))
        dequantization = TRUNCATED_NORMAL
    n = values.numel()
    se = float(values.std() / math.sqrt(n)) if n > 1 else float("nan")
    return BitsPerDim(
        bpd=float(values.mean()), stderr=se, trivial=math.log2(dataset.levels),
        levels=int(dataset.levels), dims=dims, log_scale_per_dim=dataset.log_scale_per_dim,
        convention=convention, values=values, dequantization=dequantization,
        noise_scale=noise_scale if log_q is not None else None, log_q=log_q,
    )  # fmt: skip


def authors_solver(partition: Partition, fallback: SolverSettings) -> SolverSettings:
    """The authors' likelihood solver: RK4 with ``1000 // K`` steps in each of K interval blocks
    (at least one). DPSM grids keep ``fallback`` (the run's eval solver: appendix H's Euler)."""
    if partition.kind == "grid":
        return fallback
    k = partition.num_blocks
    return SolverSettings("rk4", (max(1, AUTHORS_STEPS // k),) * k)


@dataclass(frozen=True)
class EvalSettings:
    """How a run is scored, every choice resolved (what a record needs to be reproduced).

    Attributes:
        convention: ``"psm"`` or ``"authors"`` (image data), None for data without levels.
        solver: the ODE solver.
        trace: ``"exact"`` or ``"hutchinson"``.
        probes: Hutchinson probes per solve / evaluation.
        redraw: ``"solve"`` or ``"evaluation"``.
        t0: where the likelihood integral starts.
        dequantize: whether the test images are dequantized (None for data without levels).
        dequantization: how, when they are: ``"uniform"`` (the default) or
            ``"truncated-normal"`` (:mod:`psm.data.dequantize`); None for the authors'
            convention and data without levels.
    """

    convention: str | None
    solver: SolverSettings
    trace: TraceMethod
    probes: int
    redraw: ProbeRedraw
    t0: float
    dequantize: bool | None
    dequantization: str | None = UNIFORM


def check_dequantization(
    run: Run | ModelSource, dequantization: str, convention: str = "psm"
) -> str | None:
    """The canonical dequantization for scoring ``run`` in ``convention`` (None where nothing
    is dequantized: the authors' convention, data without levels).

    Raises:
        PSMError: an unknown name; truncated-normal with the authors' convention or on data
            without levels.
    """
    name = dequantization_name(dequantization)
    image = is_image_data(run.dataset)
    if name == TRUNCATED_NORMAL:
        if not image:
            raise PSMError(
                f"truncated-normal dequantization is for image data; {run.config.data.name} "
                "has no levels (its NLL is in nats)"
            )
        if convention != "psm":
            raise PSMError(
                "truncated-normal dequantization applies to the psm convention; the authors' "
                "convention is not dequantized"
            )
    return name if image and convention == "psm" else None


def eval_settings(
    run: Run | ModelSource,
    *,
    convention: Convention = "psm",
    solver: SolverSettings | None = None,
    trace: TraceMethod | Literal["auto"] | None = None,
    probes: int = 1,
    redraw: ProbeRedraw | None = None,
    dequantization: Dequantization | str = UNIFORM,
) -> EvalSettings:
    """Resolve a run's evaluation settings: given values win, then the convention's, then the
    run's ``eval`` section; ``trace`` ``None``/``"auto"`` is exact up to
    :data:`~psm.core.likelihood.EXACT_TRACE_MAX_DIM` dimensions, Hutchinson above;
    ``dequantization`` (``"uniform"``, ``"truncated-normal"`` or ``"tn"``) applies to the psm
    convention on image data.

    Raises:
        PSMError: ``convention="authors"`` for data without levels, an unknown convention or
            dequantization, truncated-normal dequantization with the authors' convention or on
            data without levels.
    """
    if convention not in CONVENTIONS:
        raise PSMError(f"unknown convention {convention!r} (choose from psm, authors)")
    if probes < 1:
        raise PSMError(f"probes must be >= 1, got {probes}")
    deq = check_dequantization(run, dequantization, convention)
    own = run.config.eval.solver_settings()
    image = is_image_data(run.dataset)
    dims = math.prod(run.shape)
    if convention == "authors":
        if not image:
            raise PSMError(
                f"the authors' convention is for image data; {run.config.data.name} has none "
                "(its NLL is in nats)"
            )
        return EvalSettings(
            convention="authors",
            solver=solver or authors_solver(run.partition, own),
            trace="hutchinson" if trace in (None, "auto") else trace,
            probes=probes,
            redraw=redraw or "evaluation",
            t0=AUTHORS_T0,
            dequantize=False,
            dequantization=None,
        )
    return EvalSettings(
        convention="psm" if image else None,
        solver=solver or own,
        trace=auto_trace(dims) if trace in (None, "auto") else trace,
        probes=probes,
        redraw=redraw or "solve",
        t0=run.partition.t0,
        dequantize=True if image else None,
        dequantization=deq,
    )


@dataclass(frozen=True)
class RunEvaluation:
    """A run's test NLL beside what the data allow.

    Attributes:
        result: the NLL on the test set (nats per point).
        dataset: the dataset's name.
        entropy: the data's true entropy in nats (the NLL floor), when known.
        grid_field: the DPSM field used (``None`` for interval partitions).
        bits: bits/dim for image data (None otherwise).
        settings: the resolved settings (None when scored by :func:`evaluate_model` without
            them).
    """

    result: NLLResult
    dataset: str
    entropy: float | None
    grid_field: str | None
    bits: BitsPerDim | None = None
    settings: EvalSettings | None = None

    def __str__(self) -> str:
        """One line for a person: ``NLL 1.2345 ± 0.0110 nats on 3000 test points of ty (true
        entropy, the floor: 0.4750)``; images lead with bits/dim and their convention."""
        r = self.result
        unit = "images" if self.bits is not None else "points"
        line = f"NLL {r.nll:.4f} ± {r.stderr:.4f} nats on {r.n} test {unit} of {self.dataset}"
        if self.entropy is not None:
            line += f" (true entropy, the floor: {self.entropy:.4f})"
        if self.bits is not None:
            b = self.bits
            how = f"{b.convention} convention"
            if b.dequantization is not None:
                how += f", {b.dequantization} dequantization"
            line = (
                f"{b.bpd:.4f} ± {b.stderr:.4f} bits/dim ({how}; trivial bound "
                f"{b.trivial:.4f}); {line}"
            )
        return line


def truncated_normal_test_set(
    dataset: ImageDataset, process, *, t0: float, n: int, seed: int
) -> tuple[Tensor, Tensor, TruncatedNormal]:
    """The first ``min(n, n_test)`` test images dequantized with truncated-normal noise for a
    model on ``process`` starting at ``t0`` (one draw seeded by ``seed``, as
    :meth:`~psm.data.images.ImageDataset.test_set` draws uniform noise).

    Returns:
        ``(y [n, C, H, W] float32, log_q [n] float64, q)``.
    """
    q = truncated_normal_for(process, t0, dataset)
    k = dataset.test_levels(n)
    y, log_q = truncated_normal_levels(dataset, q, k, torch.Generator().manual_seed(seed))
    return y, log_q, q


def evaluate_model(
    model: BlockModel,
    dataset: Dataset,
    *,
    n: int,
    test_seed: int,
    settings: EvalSettings,
    probe_seed: int = 0,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prior_log_prob=None,
    progress: bool = True,
) -> RunEvaluation:
    """Score a model on a dataset's test set under resolved settings (no disk involved).

    The model is moved to ``settings.t0`` (:func:`with_t0`); image test sets are drawn in the
    settings' convention (dequantized or not) and dequantization (uniform, or truncated-normal
    with the model's ``σ_t0/α_t0``: :func:`truncated_normal_test_set`) and the result carries
    bits/dim.

    Args:
        model: the assembled blocks.
        dataset: the run's dataset; a :class:`~psm.data.base.Quantized` one (images) also
            gets bits/dim.
        n: test points.
        test_seed: seed of the test set (its dequantization noise, for images).
        settings: from :func:`eval_settings` (or built by hand).
        probe_seed: seed of the Hutchinson probes.
        batch_size: points per solve.
        device: where to evaluate.
        dtype: evaluation dtype.
        prior_log_prob: log-density at t = 1 (default ``N(0, I)``; tests pass the exact one).
        progress: show a progress bar (``NLL``, one step per solver step).
    """
    model = with_t0(model, settings.t0)
    image = is_image_data(dataset)
    tn = image and settings.dequantize and settings.dequantization == TRUNCATED_NORMAL
    if tn:
        if not isinstance(dataset, ImageDataset):
            raise PSMError(f"truncated-normal dequantization needs image levels; {dataset.name}")
        x, log_q, q = truncated_normal_test_set(
            dataset, model.process, t0=settings.t0, n=n, seed=test_seed
        )
    else:
        x = dataset.test_set(n, test_seed, dequantize=settings.dequantize)
    with progress_bar("NLL", enabled=progress) as bar:
        result = evaluate_nll(
            model, x, batch_size=batch_size, solver=settings.solver, trace=settings.trace,
            probes=settings.probes, redraw=settings.redraw, seed=probe_seed, device=device,
            dtype=dtype, prior_log_prob=prior_log_prob, progress=bar,
        )  # fmt: skip
    if tn:
        bits = bits_per_dim(result, dataset, "psm", log_q=log_q, noise_scale=q.scale)
    else:
        bits = bits_per_dim(result, dataset, settings.convention or "psm") if image else None
    return RunEvaluation(
        result, dataset.name, dataset.entropy,
        model.grid_field if model.is_grid else None, bits, settings,
    )  # fmt: skip


def evaluate_run(
    run: str | Path | Run | ModelSource,
    *,
    n: int | None = None,
    solver: SolverSettings | None = None,
    trace: TraceMethod | Literal["auto"] | None = None,
    probes: int = 1,
    redraw: ProbeRedraw | None = None,
    convention: Convention = "psm",
    test_seed: int | None = None,
    probe_seed: int = 0,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    grid_field: GridField = "constant",
    progress: bool = True,
    dequantization: Dequantization | str = UNIFORM,
    exact_blocks: Sequence[int] = (),
) -> RunEvaluation:
    """Test NLL of a trained run on its dataset's test set (``data.test_set(n, seed)``), and
    bits/dim for image data.

    Defaults come from the run's ``eval`` config section (``n_test``, ``test_seed`` and the
    solver, :meth:`~psm.runs.config.EvalConfig.solver_settings`) and, for images, from the
    convention (module docstring).

    Args:
        run: a run directory, an open :class:`~psm.runs.run.Run`, a :class:`ModelSource`, or
            an exported ``.safetensors`` file (its test set rebuilt from the config, or from
            the recorded data files when they are here; refused in one line otherwise).
        n: test points.
        solver: the ODE solver (default: the convention's, else the run's
            ``eval.solver_settings()``).
        trace: ``"exact"``, ``"hutchinson"``, or ``"auto"``/None (exact up to 16 dimensions).
        probes: Hutchinson probes averaged per solve (or per evaluation).
        redraw: when probes are drawn, ``"solve"`` or ``"evaluation"`` (default: the
            convention's).
        convention: ``"psm"`` (dequantized bits/dim) or ``"authors"`` (image runs only).
        test_seed: seed of the test set.
        probe_seed: seed of the Hutchinson probes.
        batch_size: points per solve.
        device: where to evaluate.
        dtype: evaluation dtype.
        grid_field: DPSM field, ``"constant"`` (paper) or ``"linear"``.
        progress: show a progress bar.
        dequantization: image runs, psm convention: ``"uniform"`` (default) or
            ``"truncated-normal"`` (``"tn"``; module docstring).
        exact_blocks: blocks replaced by the data's exact score (2D mixtures;
            :mod:`psm.core.exact_block`): where the NLL is lost, by block. Those blocks need not
            be trained.

    Returns:
        A :class:`RunEvaluation` (NLL ± s.e., the true-entropy floor when the data have one,
        bits/dim ± s.e. for images, and the resolved settings).

    Raises:
        IncompleteRunError: the run has missing or unfinished blocks.
        DataError: a data file changed since the run was created, or an export's data are not
            here.
        PSMError: the authors' convention on data without levels; truncated-normal
            dequantization with the authors' convention or on data without levels.
    """
    r = open_source(run)
    dataset = r.test_data()  # a changed or vanished data file, before anything is built
    ev = r.config.eval
    settings = eval_settings(
        r, convention=convention, solver=solver, trace=trace, probes=probes, redraw=redraw,
        dequantization=dequantization,
    )  # fmt: skip
    keep = None
    if exact_blocks:
        if not isinstance(dataset, ExactDensity):
            raise PSMError(
                f"exact blocks need data with an exact score (the 2D mixtures), not "
                f"{r.config.data.name!r}"
            )
        keep = [b for b in range(r.num_blocks) if b not in set(exact_blocks)]
    model = r.load(device=device, dtype=dtype, grid_field=grid_field, t0=settings.t0,
                   blocks=keep)  # fmt: skip
    if exact_blocks:
        from ..core.exact_block import with_exact_blocks

        try:
            model = with_exact_blocks(model, dataset.marginal_score, exact_blocks)
        except ValueError as e:
            raise PSMError(f"exact blocks: {e}") from None
    return evaluate_model(
        model, dataset, n=n or ev.n_test, test_seed=ev.test_seed if test_seed is None else
        test_seed, settings=settings, probe_seed=probe_seed, batch_size=batch_size,
        device=device, dtype=dtype, progress=progress,
    )  # fmt: skip
