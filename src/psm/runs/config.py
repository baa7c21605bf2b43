"""Run configuration: typed sections loaded from YAML, command-line overrides, and the hash
that ties every block checkpoint to the problem it was trained on.

A config file is a mapping of sections (``data``, ``process``, ``partition``, ``net``,
``train``, ``executor``, ``eval``). ``data``, ``net`` and ``executor`` are discriminated by
``name``: each member is a spec registered next to its code (:data:`psm.data.DATASETS`,
:data:`psm.nets.NETS`, :data:`psm.executors.EXECUTORS`), which builds the part; ``process.name``
and ``partition.kind`` pick a builder (:data:`psm.core.process.PROCESSES`,
:data:`PARTITION_KINDS`). Unknown fields and wrong types are refused with a message that names the
field (``train.lr: Input should be a valid number``). Configs in psm 0.1's layout (t0 under
``process``) still load (:func:`migrate_layout`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..core.objective import OBJECTIVES, MSESpec, ObjectiveSpec
from ..core.ode import SOLVER_NAMES, SolverSettings
from ..core.partition import DEFAULT_T0, Partition, PartitionError, equal, geometric, grid, splits
from ..core.process import PROCESSES, Process, make_process
from ..data import DATASETS, DataSpec
from ..data.toy import ToyData
from ..errors import ConfigError
from ..nets import NETS, MLPSpec, NetSpec
from ..spec import Builders, Registry, Section, Spec, SpecError, canonical
from .wandb_log import WandbConfig


class ProcessConfig(Section):
    """The forward process (see :mod:`psm.core.process`)."""

    name: str = "vp"  # a name of PROCESSES: vp (paper DDPM, ε-prediction), ot (flow matching)
    b_min: float = Field(0.0, ge=0.0)  # VP b(t) = b_min + (b_max - b_min) t
    b_max: float = Field(10.0, gt=0.0)
    sigma_min: float = Field(1e-4, ge=0.0, lt=1.0)  # OT path noise floor
    # default: the process's own; x0 (clean point), v (α ε − σ x0), score (−ε/σ): any path
    prediction: Literal["epsilon", "velocity", "x0", "v", "score"] | None = None

    def build(self) -> Process:
        """The :class:`~psm.core.process.Process` this section describes."""
        return make_process(
            self.name, b_min=self.b_min, b_max=self.b_max, sigma_min=self.sigma_min,
            prediction=self.prediction,
        )  # fmt: skip

    @field_validator("name")
    @classmethod
    def _known_process(cls, v: str) -> str:
        return PROCESSES.check(v)


class PartitionConfig(Section):
    """How the time domain ``[t0, 1]`` is cut into blocks (see :mod:`psm.core.partition`)."""

    discriminator: ClassVar[str] = "kind"

    kind: str = "equal"  # a name of PARTITION_KINDS: equal, splits, geometric, grid, auto
    blocks: int = 1  # kind=equal, geometric or auto: K (1 = SA-DPM)
    splits: list[float] | None = None  # kind=splits: e.g. [0, 0.1, 1]
    points: int | list[float] | None = None  # kind=grid: N, or explicit times
    first: float | None = None  # kind=geometric: the first inner edge (then x r up to 1)
    t0: float = Field(DEFAULT_T0, gt=0.0, lt=1.0)  # smallest time, training and inference
    pilot_steps: int | None = Field(None, ge=2)  # kind=auto: the SA-DPM pilot's steps (4000)
    chosen_by: str | None = None  # set by kind=auto on the splits it chose (psm.auto.splits)

    def build(self) -> Partition:
        """The :class:`~psm.core.partition.Partition` this section describes."""
        return PARTITION_KINDS.get(self.kind)(self)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        return PARTITION_KINDS.check(v)

    @model_validator(mode="after")
    def _valid(self) -> PartitionConfig:
        try:
            self.build()
        except PartitionError as e:
            raise ValueError(str(e)) from None
        return self


PARTITION_KINDS: Builders[Callable[[PartitionConfig], Partition]] = Builders("partition kind")
"""How ``partition.kind`` cuts ``[t0, 1]``: a builder takes the section, fetches the fields its
kind needs with :func:`required` and returns the :class:`~psm.core.partition.Partition`. A new
kind is one builder and its ``@PARTITION_KINDS.register`` line (the section's fields are
hashed: a kind needing a new field adds it with a default that changes nothing)."""


def required(section: PartitionConfig, field: str) -> Any:
    """``section.<field>`` for a partition kind that needs it, or a one-line
    :class:`~psm.core.partition.PartitionError` naming it."""
    value = getattr(section, field)
    if value is None:
        raise PartitionError(f"partition.{field} is required for kind={section.kind}")
    return value


@PARTITION_KINDS.register("equal")
def _equal(p: PartitionConfig) -> Partition:
    return equal(p.blocks, t0=p.t0)


@PARTITION_KINDS.register("splits")
def _splits(p: PartitionConfig) -> Partition:
    return splits(required(p, "splits"), t0=p.t0)


@PARTITION_KINDS.register("geometric")
def _geometric(p: PartitionConfig) -> Partition:
    return geometric(p.blocks, required(p, "first"), t0=p.t0)


@PARTITION_KINDS.register("grid")
def _grid(p: PartitionConfig) -> Partition:
    return grid(required(p, "points"), t0=p.t0)


@PARTITION_KINDS.register("auto")
def _auto(p: PartitionConfig) -> Partition:
    """K blocks whose splits a pilot chooses when ``psm train`` starts (:mod:`psm.auto.splits`);
    until then, for checks and block counts only, K equal blocks (a run is never made of it:
    :meth:`~psm.runs.run.Run.create` refuses an unresolved ``auto``)."""
    return equal(p.blocks, t0=p.t0)


def parse_budget(value: int | str) -> tuple[str, float]:
    """A budget as ``("steps", block-steps)`` or ``("seconds", wall seconds)``.

    ``2000000`` (or ``"2000000"``) is block-steps summed over the blocks; ``"1h"``, ``"45m"``,
    ``"90s"`` or ``"1h30m"`` is wall-clock time, turned into block-steps by a rate measured at
    the start (:mod:`psm.auto.budget`).

    Raises:
        ValueError: anything else (a one-line message).
    """
    if isinstance(value, bool):
        raise ValueError(f"budget {value!r}: give block-steps (2000000) or a time (1h, 45m)")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        n = int(value)
        if n < 1:
            raise ValueError(f"budget {value!r}: needs at least 1 block-step")
        return "steps", float(n)
    import re

    m = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s)?\s*",
                     str(value))  # fmt: skip
    if not m or not any(m.groups()):
        raise ValueError(f"budget {value!r}: give block-steps (2000000) or a time (1h, 45m, 90s)")
    h, mi, se = (float(g) if g else 0.0 for g in m.groups())
    seconds = 3600 * h + 60 * mi + se
    if seconds <= 0:
        raise ValueError(f"budget {value!r}: needs a positive time")
    return "seconds", seconds


class Candidate(Section):
    """One entry of ``train.budget.candidates``: a net and objective a block may get, as partial
    ``net:`` and ``objective:`` sections merged onto the run's (as in ``blocks:``); ``{}`` is the
    run's own."""

    net: dict[str, Any] | None = None
    objective: dict[str, Any] | None = None


class BudgetConfig(Section):
    """``train.budget``: psm gives each block its steps from measurements (``--budget``).

    The rule (:mod:`psm.auto.budget`, docs/auto.md): a pilot of ``pilot`` of the total, equal
    for every block, in two halves; then chunks of ``chunk`` of the total go, a round at a time,
    to the blocks whose held-out bound term fell fastest per step in their last chunk
    (``rule: trend``: fastest by a fit against log steps over each block's last doubling; one
    chunk per worker per round; every ``explore_every``-th round gives ``explore_share`` of a
    chunk to the blocks with the fewest steps instead); with a decaying ``lr_schedule``, the
    last ``cooldown`` of the total is shared in proportion to the steps each block got and
    trained with the decay.
    """

    total: int | str  # block-steps (2000000) or a wall-clock time ("1h")
    pilot: float = Field(0.1, gt=0.0, lt=1.0)  # share of the total in the pilot
    chunk: float = Field(0.04, gt=0.0, lt=1.0)  # share of the total in one chunk
    cooldown: float = Field(0.2, ge=0.0, lt=1.0)  # share for the decay (decaying lr_schedule)
    explore_every: int = Field(4, ge=0)  # every n-th round: the least-trained blocks (0: never)
    explore_share: float = Field(0.25, gt=0.0, le=1.0)  # an explore round's share of a chunk
    probe: int = Field(1000, ge=1)  # time budgets: steps per block that measure the rate
    # how a chunk round ranks blocks: ``rate``, the fall per step over each block's last chunk;
    # ``trend``, the fall per step its held-out term's fit against log steps (over its last
    # doubling, every measurement) predicts for the next chunk
    rule: Literal["rate", "trend"] = "rate"
    # each block's net and objective from a race (psm.auto.nets): candidate patches of ``net``
    # and ``objective`` ({} is the run's own), each trained on every block for ``race`` of the
    # total (shared by the candidates); a block keeps the candidate with the lowest held-out term
    candidates: list[Candidate] | None = None
    race: float = Field(0.1, gt=0.0, lt=1.0)
    # what the race compares: ``heldout``, each block's held-out bound term (the SDE's bound);
    # ``nll``, the held-out ODE NLL of candidate 0's model with that block swapped in
    race_by: Literal["heldout", "nll"] = "heldout"

    @field_validator("total")
    @classmethod
    def _parse_total(cls, v: int | str) -> int | str:
        kind, amount = parse_budget(v)
        return int(amount) if kind == "steps" else str(v).strip()  # one spelling, one hash

    @model_validator(mode="after")
    def _fits(self) -> BudgetConfig:
        if self.pilot + self.cooldown >= 1.0:
            raise ValueError("budget: pilot + cooldown must leave a share for the chunks")
        if self.candidates is not None and len(self.candidates) < 2:
            raise ValueError("budget.candidates: give two or more to race ({} is the run's own)")
        return self


class InitFrom(Section):
    """``train.init_from``: a warm start. Every block of a new run starts (at step 0) from a
    trained run's final weights instead of its random init (:mod:`psm.runs.warm_start`).

    Written ``RUN``, ``RUN:BLOCK`` or ``RUN:time``: a source with one block (SA-DPM) gives
    every block its net, one with as many blocks as this run gives block b its block b,
    ``RUN:BLOCK`` gives every block that block, and ``RUN:time`` gives each block the source
    block that owns the middle of its time range (its neighbour in time: a source with other
    splits or another number of blocks, e.g. a 5-block run refined into 10). ``hash`` is the
    source's config hash, filled in when the run is created; the config hash covers it,
    ``block`` and ``match``, not the path (a moved source is fine).
    """

    run: str  # the source run directory
    block: int | None = Field(None, ge=0)  # RUN:BLOCK: every block from this source block
    match: Literal["time"] | None = None  # RUN:time: each block from its neighbour in time
    hash: str | None = None  # the source's config hash (resolved by Run.create)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, v: Any) -> Any:
        """``"RUN"``, ``"RUN:BLOCK"`` or ``"RUN:time"`` as the mapping; a mapping passes
        unchanged."""
        if isinstance(v, Path):
            v = str(v)
        if isinstance(v, dict | InitFrom):
            return v
        if not isinstance(v, str):
            raise ValueError("expected a run directory: RUN, RUN:BLOCK or RUN:time")
        text = v.strip()
        head, sep, tail = text.rpartition(":")
        if sep and head and tail.isdigit():
            return {"run": head, "block": int(tail)}
        if sep and head and tail == "time":
            return {"run": head, "match": "time"}
        return {"run": text}

    @model_validator(mode="after")
    def _one_map(self) -> InitFrom:
        if self.block is not None and self.match is not None:
            raise ValueError("give a source block or match: time, not both")
        return self

    @field_validator("run")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("give the source run directory (RUN, RUN:BLOCK or RUN:time)")
        return v


class TrainConfig(Section):
    """One block's optimisation (appendix H: Adam, lr 1e-3, batch 512, fresh samples)."""

    steps: int = Field(20000, ge=1)  # parameter updates per block
    # per-block step targets (one per block, block 0 first), in place of ``steps``: a fixed
    # total given mostly to the hard blocks near t = 0 (docs/results.md, "A better recipe")
    block_steps: list[Annotated[int, Field(ge=1)]] | None = None
    max_seconds: float | None = Field(None, gt=0)  # optional wall-clock budget per block
    batch_size: int = Field(512, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    seed: int = 0  # block i uses seeds derived from (seed, i)
    checkpoint_every: int = Field(2000, ge=1)  # steps between resumable checkpoints
    log_every: int = Field(100, ge=1)  # steps between metric lines / status updates
    # steps between measurements of each block's held-out denoising bound (its KL term up to
    # a constant; psm.core.heldout), also taken at the end of every training call; 0: off.
    # Not hashed: it changes no weight
    heldout_every: int = Field(1000, ge=0)
    heldout_points: int = Field(4096, ge=2)  # points (and times) in a block's held-out batch
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    threads: int | None = Field(None, ge=1)  # torch threads per worker (default: cores/workers)
    # the recipe (hashed where set: it changes what a block learns)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"  # decay to 0 over steps
    warmup: int = Field(0, ge=0)  # steps of linear learning-rate warm-up from 0
    ema: float | None = Field(None, gt=0.0, lt=1.0)  # EMA decay; inference uses the EMA weights
    grad_clip: float | None = Field(None, gt=0.0)  # clip each block's gradient norm to this
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast the forward (GPU); fp32 Adam
    compile: bool = False  # torch.compile a block's net (one block per worker; not stacks)
    # what a block learns from: its times, pairs and loss weights (a member of OBJECTIVES;
    # hashed unless it is the default, mse)
    objective: SerializeAsAny[ObjectiveSpec] = Field(default_factory=MSESpec)
    # psm chooses the blocks' step targets from measurements (``--budget``; hashed when set,
    # and then ``steps``/``block_steps``/``block_decay`` are the plan's, not hashed)
    budget: BudgetConfig | None = None
    # per block, the step from which a decaying lr_schedule decays to 0 at the block's target
    # (default 0: over the whole target); a budget plan sets it for its final cool-down
    block_decay: list[Annotated[int, Field(ge=0)]] | None = None
    # a warm start: every block starts from a trained run's final weights (``RUN`` or
    # ``RUN:BLOCK``; psm.runs.warm_start); hashed: the source's config hash and the block
    init_from: InitFrom | None = None
    # keep each block's resume point (weights, Adam moments, EMA) once it is done; False: only
    # its final weights stay, as after ``psm prune`` (more steps later restart its optimizer).
    # Not hashed: it changes no weight a block is trained to
    keep_state: bool = True
    # Weights & Biases logging beside TensorBoard, one W&B run per block (psm.runs.wandb_log;
    # a mapping or the project name). Not hashed: it changes no weight
    wandb: WandbConfig | None = None

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_member(cls, v: Any) -> ObjectiveSpec:
        return _member(OBJECTIVES, v)


class EvalConfig(Section):
    """Defaults for ``psm nll`` / ``psm sample``."""

    n_test: int = Field(30000, ge=1)  # test points for the NLL
    steps: int = Field(1000, ge=1)  # RK4 steps over [t0, 1] (paper: 1000)
    solver: str = "rk4"  # a name of psm.core.ode.SOLVERS
    rtol: float = Field(SolverSettings.rtol, gt=0.0)  # adaptive solvers (dopri5): tolerances
    atol: float = Field(SolverSettings.atol, gt=0.0)
    test_seed: int = 12345  # seed of the synthetic test set

    @field_validator("solver")
    @classmethod
    def _known_solver(cls, v: str) -> str:
        if v not in SOLVER_NAMES:
            raise ValueError(f"unknown solver {v!r} (choose from {', '.join(SOLVER_NAMES)})")
        return v

    def solver_settings(self) -> SolverSettings:
        """This section's ODE solver: ``solver``, ``steps``, ``rtol`` and ``atol`` as one
        :class:`~psm.core.ode.SolverSettings` (the one conversion; callers never rebuild it)."""
        return SolverSettings(self.solver, self.steps, self.rtol, self.atol)


class BlockOverride(Section):
    """One entry of ``blocks:``: settings of blocks ``first..last`` that differ from the run's.

    ``net`` and ``objective`` are partial sections merged onto the run's ``net:`` and
    ``train.objective`` (a different ``name`` replaces the section instead), so a hard block can
    get a wider net, another input scale, Fourier features or another objective/prediction::

        blocks:
          - {first: 0, net: {hidden: [256, 256, 256]}, objective: {prediction: x0}}
          - {first: 3, last: 4, objective: {name: likelihood}}

    Hashed when present (it changes what those blocks learn); no entry, no change to the hash.
    """

    first: int = Field(ge=0)
    last: int | None = Field(None, ge=0)  # default: ``first`` (one block)
    net: dict[str, Any] | None = None
    objective: dict[str, Any] | None = None
    chosen_by: str | None = None  # set by psm (train.budget.candidates' race); not hashed

    @model_validator(mode="after")
    def _valid(self) -> BlockOverride:
        if self.last is not None and self.last < self.first:
            raise ValueError(f"last ({self.last}) is below first ({self.first})")
        if self.net is None and self.objective is None:
            raise ValueError("an entry of blocks: needs net: or objective: (or both)")
        return self

    @property
    def span(self) -> range:
        """The blocks this entry covers."""
        return range(self.first, (self.first if self.last is None else self.last) + 1)


def _merged(registry: Registry, base: Spec, patch: dict[str, Any] | None) -> Any:
    """``base`` with the fields of ``patch`` (a whole new member when ``patch`` names another)."""
    if not patch:
        return base
    if patch.get("name", base.name) != base.name:
        return registry.validate(patch)
    return registry.validate({**base.model_dump(mode="json"), **patch})


class RunConfig(Section):
    """A whole run."""

    name: str = "run"
    out: str | None = None  # run directory; default runs/<name>
    data: SerializeAsAny[DataSpec] = Field(default_factory=ToyData)  # a member of DATASETS
    process: ProcessConfig = Field(default_factory=ProcessConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    net: SerializeAsAny[NetSpec] = Field(default_factory=MLPSpec)  # a member of NETS
    train: TrainConfig = Field(default_factory=TrainConfig)
    # a member of psm.executors.EXECUTORS (not hashed: who trains a block changes nothing)
    executor: SerializeAsAny[Spec] = Field(default_factory=lambda: _executors().validate({}))
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # per-block nets and objectives (BlockOverride); hashed when present
    blocks: list[BlockOverride] = Field(default_factory=list)

    @field_validator("data", mode="before")
    @classmethod
    def _data_member(cls, v: Any) -> DataSpec:
        return _member(DATASETS, v)

    @field_validator("net", mode="before")
    @classmethod
    def _net_member(cls, v: Any) -> NetSpec:
        return _member(NETS, v)

    @field_validator("executor", mode="before")
    @classmethod
    def _executor_member(cls, v: Any) -> Spec:
        return _member(_executors(), v)

    @model_validator(mode="after")
    def _block_steps_fit(self) -> RunConfig:
        k = self.partition.build().num_blocks
        for field_name in ("block_steps", "block_decay"):
            given = getattr(self.train, field_name)
            if given is not None and len(given) != k:
                raise ValueError(
                    f"train.{field_name} has {len(given)} entries but the partition has {k} "
                    "blocks: give one per block"
                )
        return self

    @model_validator(mode="after")
    def _keep_state_fits(self) -> RunConfig:
        if not self.train.keep_state and (self.train.budget or self.partition.kind == "auto"):
            what = "train.budget" if self.train.budget else "partition.kind auto"
            raise ValueError(
                f"train.keep_state: false does not go with {what}, which extends blocks round "
                "by round (each extension would restart their optimizer); run psm prune after "
                "training instead"
            )
        return self

    @model_validator(mode="after")
    def _blocks_fit(self) -> RunConfig:
        if not self.blocks:
            return self
        k = self.partition.build().num_blocks
        owner: dict[int, int] = {}
        for i, o in enumerate(self.blocks):
            if o.span.stop > k:
                raise ValueError(
                    f"blocks[{i}] covers blocks {o.span.start}-{o.span.stop - 1} but the "
                    f"partition has {k} (0-{k - 1})"
                )
            for b in o.span:
                if b in owner:
                    raise ValueError(f"blocks[{i}] and blocks[{owner[b]}] both set block {b}")
                owner[b] = i
            self._check_patches(f"blocks[{i}]", o.net, o.objective)
        return self

    def _check_patches(self, where: str, net: dict | None, objective: dict | None) -> None:
        """Refuse a partial ``net:``/``objective:`` that does not merge onto the run's."""
        for what, registry, base, patch in (
            ("net", NETS, self.net, net),
            ("objective", OBJECTIVES, self.train.objective, objective),
        ):
            try:
                _merged(registry, base, patch)
            except SpecError as e:
                loc = f"{where}.{what}" + (f".{e.loc}" if e.loc else "")
                raise ValueError(f"{loc}: {e.message}") from None

    @model_validator(mode="after")
    def _candidates_fit(self) -> RunConfig:
        budget = self.train.budget
        if budget is None or not budget.candidates:
            return self
        if any(o.chosen_by is None for o in self.blocks):
            raise ValueError(
                "train.budget.candidates chooses each block's net and objective: drop blocks:"
            )
        for i, c in enumerate(budget.candidates):
            self._check_patches(f"train.budget.candidates[{i}]", c.net, c.objective)
        return self

    def override(self, block: int | None) -> BlockOverride | None:
        """The ``blocks:`` entry that covers ``block`` (None: none does, or ``block`` is None)."""
        if block is None:
            return None
        return next((o for o in self.blocks if block in o.span), None)

    def net_for(self, block: int | None) -> NetSpec:
        """Block ``block``'s net spec: ``net:`` with its ``blocks:`` entry merged on (None: the
        run's own)."""
        o = self.override(block)
        return self.net if o is None else _merged(NETS, self.net, o.net)

    def objective_for(self, block: int | None) -> ObjectiveSpec:
        """Block ``block``'s objective spec: ``train.objective`` with its ``blocks:`` entry
        merged on (None: the run's own)."""
        o = self.override(block)
        obj = self.train.objective
        return obj if o is None else _merged(OBJECTIVES, obj, o.objective)

    def net_key(self, block: int) -> str:
        """Equal for blocks whose nets have the same spec (and so can train in one stack)."""
        return json.dumps(self.net_for(block).model_dump(mode="json"), sort_keys=True)

    def decay_start(self, block: int) -> int:
        """The step from which block ``block``'s decaying learning rate decays
        (``train.block_decay[block]``, default 0: over the whole target)."""
        given = self.train.block_decay
        return 0 if given is None else given[block]

    def step_target(self, block: int) -> int:
        """The steps block ``block`` trains to: ``train.block_steps[block]`` if set, else
        ``train.steps``."""
        given = self.train.block_steps
        return self.train.steps if given is None else given[block]

    @property
    def out_dir(self) -> Path:
        """Where the run lives on disk."""
        return Path(self.out) if self.out else Path("runs") / self.name


def _executors() -> Registry:
    """:data:`psm.executors.EXECUTORS`, imported when first needed (the executors import this
    module)."""
    from ..executors import EXECUTORS

    return EXECUTORS


def _member(registry: Registry, raw: Any):
    """Validate a ``data:``/``net:`` mapping into the registered member its name picks."""
    try:
        return registry.validate(raw)
    except SpecError as e:
        raise PydanticCustomError(
            "member", "{message}", {"message": e.message, "loc": e.loc}
        ) from None


# Fields of ``train`` that define the learning problem. Two configs with the same values here
# (and the same data, process, partition and net) train interchangeable blocks; steps, logging,
# devices and executors may differ. The recipe fields count only when set (non-default), and a
# decaying learning-rate schedule ties the blocks to their step budget, which then counts too.
# The objective counts only when it is not the default (``mse``, what every run before it used).
HASHED_TRAIN_FIELDS = ("batch_size", "lr", "seed")
RECIPE_FIELDS = ("lr_schedule", "warmup", "ema", "grad_clip", "precision")
HASHED_SECTIONS = ("data", "process", "partition", "net")


def config_hash(cfg: RunConfig) -> str:
    """A 16-hex-digit fingerprint of the problem a block solves (data, process, partition, net,
    batch size, learning rate and seed).

    Fields at their default value are left out (:func:`psm.spec.canonical`), so a new option
    whose default keeps the old behaviour never changes an existing run's hash.
    """
    keyed: dict[str, Any] = {k: canonical(getattr(cfg, k)) for k in HASHED_SECTIONS}
    keyed["train"] = hashed_train(cfg.train)
    if cfg.blocks:  # per-block nets/objectives: only when given, so older hashes stay
        keyed["blocks"] = hashed_blocks(cfg)
    return _digest(keyed)


def hashed_blocks(cfg: RunConfig) -> list[dict[str, Any]]:
    """The ``blocks:`` entries as the hash sees them: ``last`` filled in, empty parts left out,
    and each given field at its validated value with integral numbers as integers (so
    ``fourier_scale: 2`` and ``2.0`` are one problem)."""
    out = []
    for o in cfg.blocks:
        entry: dict[str, Any] = {"first": o.span.start, "last": o.span.stop - 1}
        for what, patch, spec in (
            ("net", o.net, cfg.net_for(o.first)),
            ("objective", o.objective, cfg.objective_for(o.first)),
        ):
            if patch:
                full = spec.model_dump(mode="json")
                entry[what] = {k: _integral(full.get(k, v)) for k, v in patch.items()}
        out.append(entry)
    return out


def _integral(value: Any) -> Any:
    """``value`` with every integral float turned into an int (recursively)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


def hashed_train(train: TrainConfig) -> dict[str, Any]:
    """The ``train`` fields a config hash covers (see :data:`RECIPE_FIELDS`)."""
    dump = train.model_dump(mode="json")
    out = {k: dump[k] for k in HASHED_TRAIN_FIELDS}
    defaults = TrainConfig.model_fields
    out |= {k: dump[k] for k in RECIPE_FIELDS if dump[k] != defaults[k].default}
    if train.budget is not None:  # the plan sets the targets: the budget's rule is hashed
        out["budget"] = canonical(train.budget)
    elif train.lr_schedule != "constant":
        if train.block_steps is None:
            out["steps"] = train.steps
        else:
            out["block_steps"] = list(train.block_steps)
        if train.block_decay is not None:
            out["block_decay"] = list(train.block_decay)
    objective = canonical(train.objective)
    if objective != {"name": OBJECTIVES.default}:
        out["objective"] = objective
    if train.init_from is not None:  # the source's config hash and the block map, not its path
        out["init_from"] = {"hash": train.init_from.hash, "block": train.init_from.block}
        if train.init_from.match is not None:  # hashed only when set: older hashes stay
            out["init_from"]["match"] = train.init_from.match
    return out


def legacy_config_hash(cfg: RunConfig) -> str | None:
    """The hash psm 0.1 gave this problem (every field of its sections, t0 in ``process``), or
    None if psm 0.1 could not express it. Runs made by psm 0.1 keep their hash, so their
    checkpoints stay valid."""
    data, net = cfg.data.model_dump(mode="json"), cfg.net.model_dump(mode="json")
    if data["name"] not in LEGACY_DATA or net.get("name") != "mlp" or net.get("dropout"):
        return None
    if net.get("input_scale", 1.0) != 1.0 or cfg.partition.kind not in LEGACY_PARTITIONS:
        return None
    if cfg.blocks:
        return None
    if set(hashed_train(cfg.train)) != set(HASHED_TRAIN_FIELDS):  # a recipe/objective 0.1 lacked
        return None
    partition = cfg.partition.model_dump(mode="json")
    partition = {k: partition[k] for k in ("kind", "blocks", "splits", "points", "t0")}
    keyed = {
        "data": {"center": True, "path": None, "test_fraction": 0.1, **data},
        "process": {**cfg.process.model_dump(mode="json"), "t0": partition.pop("t0")},
        "partition": partition,
        "net": {k: net[k] for k in ("name", "hidden", "activation")},
        "train": {k: getattr(cfg.train, k) for k in HASHED_TRAIN_FIELDS},
    }
    return _digest(keyed)


LEGACY_PARTITIONS = ("equal", "splits", "grid")
LEGACY_DATA = ("ty", "hg", "8gaussians", "checkerboard", "moons", "pinwheel", "rings", "spirals",
               "swissroll", "points")  # fmt: skip


def _digest(keyed: dict[str, Any]) -> str:
    blob = json.dumps(keyed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def hashed_differences(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted names of the hashed fields whose values differ between two configs."""
    da, db = a.model_dump(mode="json"), b.model_dump(mode="json")
    da["train"], db["train"] = hashed_train(a.train), hashed_train(b.train)
    out = []
    for sec in (*HASHED_SECTIONS, "train"):
        keys = sorted(set(da[sec]) | set(db[sec]))
        out += [f"{sec}.{k}" for k in keys if da[sec].get(k) != db[sec].get(k)]
    if hashed_blocks(a) != hashed_blocks(b):
        out.append("blocks")
    return out


def migrate_layout(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw config in psm 0.1's layout, moved to today's (a new dict; others pass unchanged).

    psm 0.1 kept t0 in ``process`` and wrote ``path``/``test_fraction`` for every dataset;
    t0 now belongs to the partition (the time domain the blocks split).
    """
    process = raw.get("process")
    if not isinstance(process, dict) or "t0" not in process:
        return raw
    out = copy.deepcopy(raw)
    t0 = out["process"].pop("t0")
    partition = out.setdefault("partition", {})
    if isinstance(partition, dict):
        if "t0" in partition and partition["t0"] != t0:
            raise ConfigError("t0 is given in both process and partition; keep partition.t0")
        partition["t0"] = t0
    data = out.get("data")
    if isinstance(data, dict) and data.get("name") != "points":
        if data.get("path") is None:
            data.pop("path", None)
        if data.get("test_fraction", 0.1) == 0.1:
            data.pop("test_fraction", None)
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    ctx = first.get("ctx") or {}
    if first["type"] == "member" and ctx.get("loc"):
        loc.append(ctx["loc"])
    where = ".".join(loc) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}: {msg}{more}"


def validate_config(raw: Any, source: str = "config") -> RunConfig:
    """Validate a raw mapping (either layout) into a :class:`RunConfig`, or raise
    :class:`ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(migrate_layout(raw))
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
    executor: str | None = None,
    budget: str | None = None,
) -> RunConfig:
    """Load a YAML config and apply command-line overrides.

    Args:
        path: the YAML file.
        overrides: ``section.field=value`` strings (``--set``).
        steps: ``train.steps`` override (``--steps``).
        out: run directory override (``--out``).
        seed: ``train.seed`` override (``--seed``).
        executor: the executor to run in place of ``executor.name`` (``--executor``): the
            options it shares with the config's executor carry over, the others of that
            executor are dropped (:meth:`psm.executors.base.ExecutorRegistry.switch`).
        budget: ``train.budget.total`` (``--budget``: block-steps or a time like ``1h``); the
            rule's other fields keep the config's values or their defaults.
    """
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    raw.pop("config_hash", None)  # a run's own config.yaml: the hash is derived, not an input
    raw.setdefault("name", Path(path).stem)
    extra = list(overrides or [])
    if steps is not None:
        extra.append(f"train.steps={steps}")
    if seed is not None:
        extra.append(f"train.seed={seed}")
    if out is not None:
        extra.append(f"out={json.dumps(str(out))}")
    raw = apply_overrides(raw, extra)
    if budget is not None:
        train = raw.setdefault("train", {})
        if not isinstance(train, dict):
            raise ConfigError(f"{path}: train is not a section")
        given = train.get("budget") if isinstance(train.get("budget"), dict) else {}
        train["budget"] = {**given, "total": budget}
    if executor is not None:
        try:
            raw["executor"] = _executors().switch(raw.get("executor"), executor)
        except SpecError as e:
            raise ConfigError(f"--executor: {e.message}") from None
    cfg = validate_config(raw, str(path))
    if steps is not None and cfg.train.block_steps is not None:
        raise ConfigError(
            f"{path}: --steps sets train.steps, but this config gives each block its own "
            "target (train.block_steps); change those instead: --set 'train.block_steps=[...]'"
        )
    return cfg
