"""Run configuration: typed sections loaded from YAML, command-line overrides, and the hash
that ties every block checkpoint to the problem it was trained on.

A config file is a mapping of sections (``data``, ``process``, ``partition``, ``net``,
``train``, ``executor``, ``eval``). Unknown fields and wrong types are refused with a message
that names the field (``train.lr: Input should be a valid number``).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .partition import Partition, PartitionError, equal, grid, splits


class Section(BaseModel):
    """A config section: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """What to train on."""

    name: str = "ty"  # ty | hg | moons | 8gaussians | checkerboard | pinwheel | spirals | points
    center: bool = True  # subtract the mean (exact for the synthetic sets)
    path: str | None = None  # .npy / .csv of points, for name=points
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # held-out share of a points file

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from .data import dataset_names

        if v not in dataset_names():
            raise ValueError(f"unknown dataset {v!r} (choose from {', '.join(dataset_names())})")
        return v


class ProcessConfig(Section):
    """The forward process (see :mod:`psm.process`)."""

    name: Literal["vp", "ot"] = "vp"  # vp: paper DDPM, ε-prediction; ot: flow matching
    b_min: float = Field(0.0, ge=0.0)  # VP b(t) = b_min + (b_max - b_min) t
    b_max: float = Field(10.0, gt=0.0)
    sigma_min: float = Field(1e-4, ge=0.0, lt=1.0)  # OT path noise floor
    t0: float = Field(1e-4, gt=0.0, lt=1.0)  # time floor for training and inference
    prediction: Literal["epsilon", "velocity"] | None = None  # default: the process's own


class PartitionConfig(Section):
    """How [0, 1] is cut into blocks (see :mod:`psm.partition`)."""

    kind: Literal["equal", "splits", "grid"] = "equal"
    blocks: int = 1  # kind=equal: K (1 = SA-DPM)
    splits: list[float] | None = None  # kind=splits: e.g. [0, 0.1, 1]
    points: int | list[float] | None = None  # kind=grid: N, or explicit times

    def build(self) -> Partition:
        """The :class:`~psm.partition.Partition` this section describes."""
        if self.kind == "equal":
            return equal(self.blocks)
        if self.kind == "splits":
            if self.splits is None:
                raise PartitionError("partition.splits is required for kind=splits")
            return splits(self.splits)
        if self.points is None:
            raise PartitionError("partition.points is required for kind=grid")
        return grid(self.points)

    @model_validator(mode="after")
    def _valid(self) -> PartitionConfig:
        try:
            self.build()
        except PartitionError as e:
            raise ValueError(str(e)) from None
        return self


class NetConfig(Section):
    """The block network (see :mod:`psm.nets`)."""

    name: str = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [100, 150, 100])
    activation: str = "elu"

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from .nets import NETS

        if v not in NETS:
            raise ValueError(f"unknown net {v!r} (choose from {', '.join(sorted(NETS))})")
        return v

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, v: str) -> str:
        from .nets import ACTIVATIONS

        if v not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {v!r} (choose from {', '.join(sorted(ACTIVATIONS))})"
            )
        return v

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(w < 1 for w in v):
            raise ValueError("hidden widths must be a non-empty list of positive integers")
        return v


class TrainConfig(Section):
    """One block's optimisation (appendix H: Adam, lr 1e-3, batch 512, fresh samples)."""

    steps: int = Field(20000, ge=1)  # parameter updates per block
    max_seconds: float | None = Field(None, gt=0)  # optional wall-clock budget per block
    batch_size: int = Field(512, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    seed: int = 0  # block i uses seeds derived from (seed, i)
    checkpoint_every: int = Field(2000, ge=1)  # steps between resumable checkpoints
    log_every: int = Field(100, ge=1)  # steps between metric lines / status updates
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    threads: int | None = Field(None, ge=1)  # torch threads per worker (default: cores/workers)


class SlurmConfig(Section):
    """``executor.slurm``: the SLURM job array submitted through submitit (one block per task)."""

    cluster: Literal["slurm", "local", "debug"] = "slurm"  # local/debug: submitit's own, here
    partition: str | None = None  # sbatch --partition
    time_min: int = Field(60, ge=1)  # wall-clock limit of one task, minutes (--time)
    mem_gb: float | None = Field(None, gt=0)  # memory per task (--mem)
    cpus_per_task: int = Field(1, ge=1)  # --cpus-per-task; also the torch threads of a task
    gpus_per_node: int = Field(0, ge=0)  # --gpus-per-node
    account: str | None = None  # --account
    qos: str | None = None  # --qos
    array_parallelism: int | None = Field(None, ge=1)  # most tasks running at once (--array %N)
    folder: str | None = None  # submitit's pickles and logs; default <run>/slurm
    max_timeouts: int = Field(3, ge=0)  # requeues after hitting the time limit (pre-emption: any)
    signal_delay_s: int = Field(90, ge=1)  # time-out warning signal this long before the limit
    setup: list[str] = Field(default_factory=list)  # shell lines before a task (module load ...)
    extra: dict[str, Any] = Field(default_factory=dict)  # other sbatch options, e.g. constraint
    wait: bool = True  # wait for the jobs with a progress bar; False: submit and return


class ExecutorConfig(Section):
    """Who runs the blocks (see :mod:`psm.executors`)."""

    name: Literal["local", "ensemble", "ray", "slurm"] = "local"
    workers: int = Field(1, ge=1)  # local: processes; ensemble: stacks trained side by side
    ensemble_size: int | None = Field(None, ge=1)  # ensemble: most blocks stacked at once
    address: str | None = None  # ray: 'auto', host:port or ray://...; None starts a local Ray
    local_cpus: int | None = Field(None, ge=1)  # ray: CPUs of the local Ray psm starts
    num_cpus: float = Field(1.0, gt=0)  # ray: CPUs per task (its torch threads, rounded down)
    num_gpus: float = Field(0.0, ge=0)  # ray: GPUs per task (a fraction shares a GPU)
    max_retries: int = Field(3, ge=0)  # ray: retries of a task that raised or whose worker died
    group_size: int | None = Field(None, ge=1)  # ray: blocks per task, stacked (ensemble)
    lock_wait_s: float = Field(150.0, ge=0)  # ray, slurm: wait for a lock held on another host
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)


class EvalConfig(Section):
    """Defaults for ``psm nll`` / ``psm sample``."""

    n_test: int = Field(30000, ge=1)  # test points for the NLL
    steps: int = Field(1000, ge=1)  # RK4 steps over [t0, 1] (paper: 1000)
    solver: Literal["rk4", "euler", "dopri5"] = "rk4"
    test_seed: int = 12345  # seed of the synthetic test set


class RunConfig(Section):
    """A whole run."""

    name: str = "run"
    out: str | None = None  # run directory; default runs/<name>
    data: DataConfig = Field(default_factory=DataConfig)
    process: ProcessConfig = Field(default_factory=ProcessConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    net: NetConfig = Field(default_factory=NetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def out_dir(self) -> Path:
        """Where the run lives on disk."""
        return Path(self.out) if self.out else Path("runs") / self.name

    def build_partition(self) -> Partition:
        return self.partition.build()

    def build_process(self):  # -> psm.process.Process
        from .process import make_process

        p = self.process
        return make_process(
            p.name, t0=p.t0, b_min=p.b_min, b_max=p.b_max, sigma_min=p.sigma_min,
            prediction=p.prediction,
        )  # fmt: skip

    def build_dataset(self):  # -> psm.data.Dataset
        from .data import make_dataset

        d = self.data
        return make_dataset(
            d.name, center=d.center, path=d.path, test_fraction=d.test_fraction,
            seed=self.train.seed,
        )  # fmt: skip

    def build_net(self, dim: int):  # -> torch.nn.Module
        from .nets import build_net

        return build_net(
            self.net.name, dim, time_conditioned=self.build_partition().time_conditioned,
            hidden=self.net.hidden, activation=self.net.activation,
        )  # fmt: skip


# Fields that define the learning problem. Two configs with the same values here train
# interchangeable blocks; steps, logging, devices and executors may differ.
HASHED_TRAIN_FIELDS = ("batch_size", "lr", "seed")


def config_hash(cfg: RunConfig) -> str:
    """A 16-hex-digit fingerprint of the problem a block solves (data, process, partition, net,
    batch size, learning rate and seed)."""
    d = cfg.model_dump(mode="json")
    keyed = {k: d[k] for k in ("data", "process", "partition", "net")}
    keyed["train"] = {k: d["train"][k] for k in HASHED_TRAIN_FIELDS}
    blob = json.dumps(keyed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hashed_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted names of the hashed fields whose values differ between two configs."""
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    out = []
    for sec in ("data", "process", "partition", "net", "train"):
        keys = HASHED_TRAIN_FIELDS if sec == "train" else sorted(set(da[sec]) | set(db[sec]))
        out += [f"{sec}.{k}" for k in keys if da[sec].get(k) != db[sec].get(k)]
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def validate_config(raw: Any, source: str = "config") -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig`, or raise :class:`ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing or malformed file raises :class:`ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides (values parsed as YAML) to a raw config."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: value is not valid YAML") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
            node = nxt
        node[parts[-1]] = parsed
    return out


def load_config(
    path: str | Path,
    *,
    overrides: list[str] | None = None,
    steps: int | None = None,
    out: str | None = None,
    seed: int | None = None,
) -> RunConfig:
    """Load a YAML config and apply command-line overrides.

    Args:
        path: the YAML file.
        overrides: ``section.field=value`` strings (``--set``).
        steps: ``train.steps`` override (``--steps``).
        out: run directory override (``--out``).
        seed: ``train.seed`` override (``--seed``).
    """
    raw = read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    raw.setdefault("name", Path(path).stem)
    extra = list(overrides or [])
    if steps is not None:
        extra.append(f"train.steps={steps}")
    if seed is not None:
        extra.append(f"train.seed={seed}")
    if out is not None:
        extra.append(f"out={json.dumps(str(out))}")
    return validate_config(apply_overrides(raw, extra), str(path))
