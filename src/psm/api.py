"""The short Python API: train a run, load a model, use it like a ``torch.distributions`` one.

::

    import psm

    run = psm.train("configs/toy/ty_tpsm10.yaml", out="runs/ty", steps=3000)
    model = psm.load(run)                  # a run directory or a psm export file
    x = model.sample(1000, seed=0)         # [1000, 2]
    logp = model.log_prob(x)               # [1000] nats
    print(model.nll())                     # test-set NLL ± s.e., as `psm nll`
    psm.export(run, "ty.safetensors")      # one file that travels

Coordinates. :meth:`Model.log_prob` takes, and :meth:`Model.sample` returns, points in the
**data's coordinates**: for the paper's and the classic 2D sets the dataset's own (centred when
``data.center``, as ``dataset.sample`` draws them); for the user's points (``data: points``) the
raw coordinates of the file, before the training mean is subtracted; for images pixels ``x`` in
``[0, 1]`` (``log_prob`` also takes ``uint8`` levels ``k``, dequantized to ``(k + u) / L`` as in
training). The density is that of those coordinates: the log-Jacobian of the data map
(``D log s`` for images) is added, so for images ``-log_prob(x) / (D ln 2) + log2 L`` is the
bits/dim of :meth:`Model.bits_per_dim` and ``psm nll``.

The lower layers stay as they are: this module reuses :mod:`psm.runs.inference`,
:func:`psm.core.likelihood.evaluate_nll` and :func:`psm.core.sample.sample`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .core.likelihood import NLLResult, auto_trace, evaluate_nll
from .core.model import BlockModel, GridField
from .core.ode import SolverSettings
from .data import Dataset, Quantized
from .data.dequantize import TRUNCATED_NORMAL
from .errors import BlockError, ConfigError, PSMError
from .progress import progress_bar
from .runs.config import RunConfig, read_yaml, validate_config
from .runs.inference import (
    BitsPerDim,
    ModelSource,
    OpenedModel,
    RunEvaluation,
    check_dequantization,
    eval_settings,
    evaluate_model,
    open_model,
)
from .runs.run import Run

__all__ = ["Model", "export", "load", "train"]

ALIASES = {"steps": "train.steps", "seed": "train.seed", "budget": "train.budget.total"}
"""Keyword overrides of :func:`train` that stand for a field, as ``psm train``'s flags do."""


# ---------------------------------------------------------------------------- train
def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw[a][b][c] = value`` for ``key = "a.b.c"`` (sections made as needed), as ``--set``."""
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r}: {p} is not a section")
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)


def make_config(
    config: str | Path | dict[str, Any] | RunConfig, out: str | Path | None = None, **overrides: Any
) -> RunConfig:
    """A validated config from a YAML file, a mapping or a :class:`RunConfig`, with overrides.

    Overrides follow ``psm train``: ``steps``, ``seed`` and ``budget`` set ``train.steps``,
    ``train.seed`` and ``train.budget.total``; ``executor`` switches the executor (its shared
    options carry over); any other key is a field, dotted like ``--set`` (pass
    ``**{"train.lr": 1e-3}``) or a section given as a mapping, merged into it
    (``train={"lr": 1e-3}``). Values are Python objects (not YAML text).

    Raises:
        ConfigError: a missing or malformed file, or a config that does not validate.
    """
    if isinstance(config, RunConfig):
        raw, source = config.model_dump(mode="json"), "config"
    elif isinstance(config, dict):
        raw, source = copy.deepcopy(config), "config"
    else:
        raw, source = read_yaml(config), str(config)
        if not isinstance(raw, dict):
            raise ConfigError(f"{config}: expected a mapping of sections")
        raw.setdefault("name", Path(config).stem)
    for key, value in overrides.items():
        if key == "executor":
            from .executors import EXECUTORS
            from .spec import SpecError

            try:
                raw["executor"] = EXECUTORS.switch(raw.get("executor"), value)
            except SpecError as e:
                raise ConfigError(f"executor: {e.message}") from None
            continue
        key = ALIASES.get(key, key)
        if "." not in key and isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **copy.deepcopy(value)}
        else:
            _set(raw, key, value)
    if out is not None:
        raw["out"] = str(out)
    cfg = validate_config(raw, source)
    if "steps" in overrides and cfg.train.block_steps is not None:
        raise ConfigError(
            f"{source}: steps sets train.steps, but this config gives each block its own target "
            "(train.block_steps); change those instead"
        )
    return cfg


def train(
    config: str | Path | dict[str, Any] | RunConfig,
    out: str | Path | None = None,
    *,
    progress: bool = True,
    **overrides: Any,
) -> Run:
    """Train every block of a run, as ``psm train`` does, with the config's executor.

    A run with the same problem at ``out`` is reused: its done blocks are skipped, its
    unfinished ones resume (a longer ``steps`` extends them all).

    Args:
        config: a YAML file, a mapping of sections, or a :class:`~psm.runs.config.RunConfig`.
        out: the run directory (default: the config's ``out``, else ``runs/<name>``).
        progress: show a progress bar over the block-steps.
        overrides: fields to change (:func:`make_config`), e.g. ``steps=3000``,
            ``**{"train.lr": 1e-3}``, ``net={"hidden": [64, 64]}``.

    Returns:
        The trained :class:`~psm.runs.run.Run` (every block done).

    Raises:
        ConfigError: a bad config or override.
        BlockError: a block failed (e.g. a non-finite loss); the message says which and why.
        PSMError: a block is held by another live worker, or another bad input.
        KeyboardInterrupt: training was interrupted (checkpoints saved; call again to resume).

    The torch thread count the executor sets for training is restored afterwards.
    """
    cfg = make_config(config, out, **overrides)
    threads = torch.get_num_threads()  # the executor sets its own; the caller's come back
    try:
        return _train(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: RunConfig, progress: bool) -> Run:
    """:func:`train` on a validated config (the body of ``psm train``)."""
    from .commands.train import failure_line
    from .executors import make_executor
    from .executors.monitor import ProgressMonitor
    from .runs.checkpoint import verify_checkpoints
    from .runs.layout import CONFIG_FILE
    from .runs.run_parts import Parts
    from .training.train import train_device

    executor = make_executor(cfg.executor.name, cfg)
    train_device(cfg.train.device)
    parts = Parts(cfg)
    parts.check()

    def log(line: str) -> None:
        print(line, file=sys.stderr)

    if cfg.train.init_from is not None and cfg.partition.kind != "auto":
        from .runs.warm_start import check_config

        cfg = check_config(cfg, parts)
    spent = (0, 0.0)
    if cfg.partition.kind == "auto":
        from .auto.splits import choose_splits, resolve

        choice = choose_splits(cfg, executor, log=log)
        cfg = resolve(cfg, choice)
        parts = Parts(cfg)
        spent = (choice.pilot_steps, choice.seconds)
    if cfg.train.budget is not None:
        from .auto.budget import train_budget

        run, outcomes = train_budget(
            cfg, executor, parts=parts, log=log, spent_before=spent[0], seconds_before=spent[1]
        )
    else:
        if (cfg.out_dir / CONFIG_FILE).exists():
            old = Run.open(cfg.out_dir)
            if old.hash_of(cfg) == old.hash:
                verify_checkpoints(old, list(range(old.num_blocks)))
        run = Run.create(cfg, parts=parts)
        todo = run.ledger.not_done(invocation=True)
        blocks = list(range(run.num_blocks))
        with ProgressMonitor(run, blocks, enabled=progress and bool(todo)):
            outcomes = executor.run(run, todo) if todo else []
    states = {o.state for o in outcomes}
    if "interrupted" in states:
        raise KeyboardInterrupt(f"training of {run.path} interrupted; train again to resume")
    failed = [o for o in outcomes if o.state == "failed"]
    if failed:
        raise BlockError(failure_line(run, failed))
    left = run.ledger.not_done()
    if left:
        raise PSMError(
            f"run {run.path}: block(s) {', '.join(map(str, left[:10]))} not done (held by "
            "another worker?); psm status shows each block"
        )
    return run


def export(run: str | Path | Run, out: str | Path) -> Path:
    """Write a finished run as one ``.safetensors`` file (``psm export``); returns its path.

    Raises:
        PSMError: an existing output, an unfinished run, changed data (one line each).
    """
    from .runs.export import export_run

    return export_run(run, out)


# ---------------------------------------------------------------------------- load
def load(
    source: str | Path | Run,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    grid_field: GridField = "constant",
) -> Model:
    """Load a trained model from a run directory (or an open run) or a ``psm export`` file.

    Args:
        source: the run directory, a :class:`~psm.runs.run.Run`, or an exported
            ``.safetensors`` file.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
        dtype: the nets' dtype (float64 for reference computations).
        grid_field: DPSM runs: ``"constant"`` (paper) or ``"linear"``.

    Raises:
        PSMError: a missing or unfinished run, a damaged or foreign file (one line).
    """
    from .core.device import resolve_device

    dev = resolve_device(str(device))  # DeviceError (a PSMError): not a device, or not here
    return Model(open_model(source, device=dev, dtype=dtype, grid_field=grid_field))


Method = Literal["ode", "sde"]


class Model:
    """A trained PSM model as a distribution over the data's coordinates (module docstring).

    Attributes:
        opened: the :class:`~psm.runs.inference.OpenedModel` (blocks, config, data map).
        event_shape: the shape of one point, e.g. ``(2,)`` or ``(C, H, W)``.
    """

    def __init__(self, opened: OpenedModel) -> None:
        self.opened = opened
        self.event_shape: tuple[int, ...] = tuple(opened.shape)

    def __repr__(self) -> str:
        kind = "exported model" if self.opened.is_export else "run"
        cfg = self.config
        return (
            f"psm.Model({cfg.name!r}: {cfg.data.name}, {self.source.num_blocks} block(s), "
            f"{kind} {str(self.source.path)!r})"
        )

    # ------------------------------------------------------------------ what it is
    @property
    def config(self) -> RunConfig:
        """The run's config."""
        return self.opened.config

    @property
    def source(self) -> ModelSource:
        """Where it came from: config hash, partition, block statuses, test data."""
        return self.opened.source

    @property
    def blocks(self) -> BlockModel:
        """The blocks as one :class:`~psm.core.model.BlockModel` (the lower layers' model)."""
        return self.opened.model

    @property
    def dataset(self) -> Dataset:
        """The data map (and, for data without files, the data)."""
        return self.opened.dataset

    @property
    def device(self) -> torch.device:
        return self.opened.device

    @property
    def dtype(self) -> torch.dtype:
        return self.opened.dtype

    def _solver(self, solver: str | SolverSettings | None, steps: int | None) -> SolverSettings:
        """The run's ``eval`` solver, with ``solver`` (a name or settings) and ``steps``."""
        if isinstance(solver, SolverSettings):
            base = solver
        else:
            base = self.config.eval.solver_settings()
            if solver is not None:
                try:
                    base = dataclasses.replace(base, method=solver)
                except ValueError as e:
                    raise PSMError(str(e)) from None
        if steps is not None:
            if steps < 1:
                raise PSMError(f"steps must be >= 1, got {steps}")
            base = dataclasses.replace(base, steps=steps)
        return base

    def _nll(
        self, y: Tensor, *, seed: int, trace: str, probes: int, solver: SolverSettings,
        batch_size: int, progress: bool,
    ) -> NLLResult:  # fmt: skip
        if trace not in ("exact", "hutchinson"):
            raise PSMError(f"trace must be exact, hutchinson or auto, not {trace!r}")
        if probes < 1 or batch_size < 1:
            raise PSMError("probes and batch_size must be >= 1")
        if y.shape[0] == 0:  # no points: no values
            empty = torch.zeros(0, dtype=torch.float64)
            return NLLResult(float("nan"), float("nan"), 0, 0.0, solver, trace, empty)
        with progress_bar("log p", enabled=progress) as bar:
            return evaluate_nll(
                self.blocks, y, batch_size=batch_size, solver=solver, trace=trace,  # type: ignore[arg-type]
                probes=probes, seed=seed, device=self.device, dtype=self.dtype, progress=bar,
            )  # fmt: skip

    # ------------------------------------------------------------------ distribution
    def log_prob(
        self,
        x: Tensor,
        *,
        seed: int = 0,
        trace: Literal["exact", "hutchinson", "auto"] = "exact",
        probes: int = 1,
        solver: str | SolverSettings | None = None,
        steps: int | None = None,
        batch_size: int = 1000,
        progress: bool = False,
    ) -> Tensor:
        """``log p(x)`` in nats per point, through the probability-flow ODE (paper eqs. 4, 6).

        Args:
            x: ``[N, *event_shape]`` in the data's coordinates (module docstring): 2D sets as
                the dataset draws them, the user's points as in their file, images as pixels in
                ``[0, 1]`` or ``uint8`` levels.
            seed: seeds the dequantization of ``uint8`` images and the Hutchinson probes.
            trace: ``"exact"`` (default; D backward passes per evaluation), ``"hutchinson"``,
                or ``"auto"`` (exact up to 16 dimensions).
            probes: Hutchinson probes per solve.
            solver: a solver name (``"rk4"``, ``"euler"``, ``"dopri5"``) or
                :class:`~psm.core.ode.SolverSettings` (default: the run's ``eval`` solver).
            steps: fixed-step solvers' steps over ``[t0, 1]`` (default: ``eval.steps``).
            batch_size: points per solve.
            progress: show a progress bar.

        Returns:
            ``[N]`` float64 on the CPU.
        """
        g = torch.Generator().manual_seed(seed)
        y, log_det = self.source.to_model(x, generator=g, dtype=self.dtype)
        res = self._nll(
            y, seed=seed, trace=self._trace(trace), probes=probes,
            solver=self._solver(solver, steps), batch_size=batch_size, progress=progress,
        )  # fmt: skip
        return log_det - res.values

    def _trace(self, trace: str | None) -> str:
        return auto_trace(math.prod(self.event_shape)) if trace in (None, "auto") else trace

    def sample(
        self,
        n: int,
        seed: int = 0,
        method: Method = "ode",
        *,
        solver: str | SolverSettings | None = None,
        steps: int | None = None,
        batch_size: int = 2000,
        progress: bool = False,
    ) -> Tensor:
        """Draw ``n`` samples from noise to data (``psm sample``).

        Args:
            n: how many.
            seed: seed of the noise (and of the SDE's Brownian increments).
            method: ``"ode"`` (probability flow) or ``"sde"`` (reverse SDE, Euler–Maruyama
                with the solver's steps).
            solver: a solver name or settings (default: the run's ``eval`` solver).
            steps: the solver's steps over ``[t0, 1]`` (default: ``eval.steps``).
            batch_size: samples per solve.
            progress: show a progress bar.

        Returns:
            ``[n, *event_shape]`` in the data's coordinates (images: pixels in ``[0, 1]``).
        """
        from .core.sample import sample

        if n < 1 or batch_size < 1:
            raise PSMError("n and batch_size must be >= 1")
        if method not in ("ode", "sde"):
            raise PSMError(f"method must be ode or sde, not {method!r}")
        ode = self._solver(solver, steps)
        if method == "sde":  # Euler–Maruyama: of the solver it takes the steps only
            if not ode.fixed_step:
                raise PSMError(f"the SDE takes fixed steps; {ode.method} is adaptive")
            ode = dataclasses.replace(ode, method="euler")
        gen = torch.Generator(device=self.device).manual_seed(seed)
        with progress_bar(f"sample ({method})", enabled=progress) as bar:
            y = sample(
                self.blocks, n, generator=gen, method=method, solver=ode, batch_size=batch_size,
                dtype=self.dtype, device=self.device, progress=bar,
            )  # fmt: skip
        return self.source.from_model(y)

    def nll(
        self,
        n: int | None = None,
        *,
        test_seed: int | None = None,
        trace: Literal["exact", "hutchinson", "auto"] | None = None,
        probes: int = 1,
        solver: str | SolverSettings | None = None,
        steps: int | None = None,
        convention: Literal["psm", "authors"] = "psm",
        probe_seed: int = 0,
        batch_size: int = 1000,
        progress: bool = False,
        dequantization: Literal["uniform", "truncated-normal", "tn"] = "uniform",
    ) -> RunEvaluation:
        """The test-set NLL, as ``psm nll`` computes it (same defaults, same test points).

        Args:
            n: test points (default ``eval.n_test``).
            test_seed: seed of the test set (default ``eval.test_seed``).
            trace: exact up to 16 dimensions, Hutchinson above, unless given.
            probes: Hutchinson probes per solve.
            solver, steps: as in :meth:`log_prob` (default: the run's ``eval`` solver; for
                ``convention="authors"``, the convention's).
            convention: images: ``"psm"`` (dequantized) or ``"authors"``.
            probe_seed: seed of the Hutchinson probes.
            batch_size: points per solve.
            progress: show a progress bar.
            dequantization: images, psm convention: ``"uniform"`` (``x = (k + u) / L``) or
                ``"truncated-normal"`` (``"tn"``: i-DODE's, :mod:`psm.data.dequantize`);
                named in ``.bits.dequantization``.

        Returns:
            A :class:`~psm.runs.inference.RunEvaluation`: ``.result.nll`` and ``.result.stderr``
            (nats per point, in the model's space), ``.entropy`` (the floor, when known),
            ``.bits`` (images).

        Raises:
            DataError: an exported model whose data files are not here (``psm score`` scores
                your own inputs: :meth:`log_prob`).
            PSMError: truncated-normal dequantization with the authors' convention or on data
                without levels.
        """
        src = self.source
        dataset = src.test_data()
        ev = self.config.eval
        own = solver is None and steps is None and convention == "authors"
        settings = eval_settings(
            src, convention=convention, solver=None if own else self._solver(solver, steps),
            trace=trace, probes=probes, dequantization=dequantization,
        )  # fmt: skip
        return evaluate_model(
            self.blocks, dataset, n=n or ev.n_test,
            test_seed=ev.test_seed if test_seed is None else test_seed, settings=settings,
            probe_seed=probe_seed, batch_size=batch_size, device=self.device, dtype=self.dtype,
            progress=progress,
        )  # fmt: skip

    def bits_per_dim(
        self,
        x: Tensor | None = None,
        *,
        seed: int = 0,
        trace: str | None = None,
        dequantization: Literal["uniform", "truncated-normal", "tn"] = "uniform",
        **options: Any,
    ) -> Tensor | BitsPerDim:
        """Bits/dim of images, in psm's convention (dequantized, an upper bound on the discrete
        NLL of the levels): ``(NLL - D log s) / (D ln 2) + log2 L`` with uniform
        dequantization, ``(NLL + log q) / (D ln 2)`` with truncated-normal
        (:mod:`psm.data.dequantize`).

        Args:
            x: images ``[N, C, H, W]`` (``uint8`` levels, dequantized with ``seed``, or, for
                uniform dequantization only, pixels in ``[0, 1]``); None: the test set, as
                ``psm nll``.
            seed: seeds the dequantization and the Hutchinson probes.
            trace: exact up to 16 dimensions, Hutchinson above, unless given.
            dequantization: ``"uniform"`` (``x = (k + u) / L``, the default) or
                ``"truncated-normal"`` (``"tn"``: i-DODE's training-free dequantization, the
                bin centre plus ``σ_t0/α_t0`` noise cut to the bin, at the run's ``t0``).
            options: ``probes``, ``solver``, ``steps``, ``batch_size``, ``progress`` (and with
                ``x=None`` the other options of :meth:`nll`).

        Returns:
            With ``x``: per-image bits/dim ``[N]`` (float64, CPU). Without: the test set's
            :class:`~psm.runs.inference.BitsPerDim` (mean, s.e., trivial bound ``log2 L``, its
            ``dequantization``).

        Raises:
            PSMError: data without levels (not images); truncated-normal dequantization of
                float pixels (it needs the levels' bins) or with the authors' convention.
        """
        ds = self.dataset
        if not isinstance(ds, Quantized):
            raise PSMError(f"{self.config.data.name} data have no levels: bits/dim is for images")
        if x is None:
            opts: dict[str, Any] = {"trace": trace, "dequantization": dequantization, **options}
            ev = self.nll(**opts)
            assert ev.bits is not None
            return ev.bits
        unknown = sorted(set(options) - {"probes", "solver", "steps", "batch_size", "progress"})
        if unknown:
            raise PSMError(f"bits_per_dim(x): unknown option(s) {', '.join(unknown)}")
        tn = check_dequantization(self.source, dequantization) == TRUNCATED_NORMAL
        g = torch.Generator().manual_seed(seed)
        if tn:
            y, log_q = self.source.dequantize_truncated_normal(
                x, t0=self.blocks.t0, generator=g, dtype=self.dtype
            )  # the noise at the t0 the ODE starts from
        else:
            y, _ = self.source.to_model(x, generator=g, dtype=self.dtype)
        res = self._nll(
            y, seed=seed, trace=self._trace(trace), probes=options.get("probes", 1),
            solver=self._solver(options.get("solver"), options.get("steps")),
            batch_size=options.get("batch_size", 1000), progress=options.get("progress", False),
        )  # fmt: skip
        if tn:
            return (res.values + log_q) / (math.prod(self.event_shape) * math.log(2))
        return ds.bits_per_dim(res.values)  # type: ignore[return-value]
