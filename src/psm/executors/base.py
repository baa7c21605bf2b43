"""The executor interface: who runs the blocks of a run, and the spec that configures one.

Every executor's tasks run :func:`psm.executors.task.run_task`, which trains blocks with
:func:`psm.training.train.train_block` or the ensemble trainer (which writes the same files), so
executors are interchangeable and a block started by one can be resumed by another.

Each executor has an :class:`ExecutorSpec` beside its code: the ``executor:`` section of a
config when that executor is named, holding its options and its ``psm train`` flags, and
building the :class:`Executor`. :data:`psm.executors.EXECUTORS` lists the specs.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ValidationError

from ..runs.run import Run
from ..spec import Registry, Spec, SpecError, spec_names
from ..training.train import BlockOutcome
from .flags import Flag, apply_flags

if TYPE_CHECKING:
    from typing import Self

    from ..runs.config import RunConfig


def cpu_count() -> int:
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def balanced_shares(blocks: list[int], loads: list[int], n: int) -> list[list[int]]:
    """Split ``blocks`` into at most ``n`` shares of nearly equal total load (greedy: the
    largest load first, each to the lightest share; each share in block order).

    With equal loads this is the interleaved split ``blocks[i::n]``. Empty shares are dropped.

    Args:
        blocks: block ids.
        loads: the work of each block (its step target), same order as ``blocks``.
        n: most shares (workers).
    """
    shares: list[list[int]] = [[] for _ in range(max(1, n))]
    totals = [0] * len(shares)
    for pos in sorted(range(len(blocks)), key=lambda k: (-loads[k], k)):
        i = min(range(len(shares)), key=lambda j: (totals[j], j))
        shares[i].append(pos)
        totals[i] += loads[pos]
    return [[blocks[k] for k in sorted(s)] for s in shares if s]


def longest_first(run: Run, blocks: list[int]) -> list[int]:
    """``blocks`` with the largest step targets first (a queue of whole blocks then ends with
    the short ones, so workers finish together); ties keep their order."""
    return sorted(blocks, key=lambda b: -run.config.step_target(b))


class Executor(ABC):
    """Trains a list of blocks of a run and reports one outcome per block."""

    name: str = ""

    @abstractmethod
    def run(self, run: Run, blocks: list[int]) -> list[BlockOutcome]:
        """Train ``blocks`` (ids of ``run``) to the run's step target."""

    def describe(self) -> str:
        """One line for the block plan."""
        return self.name


class ExecutorSpec(Spec):
    """The ``executor:`` section of a config: one registered member per executor, holding that
    executor's options (``executor: {name: ray, num_cpus: 2}``) and building it."""

    # the psm train flags that override this spec's fields (see psm.executors.flags)
    flags: ClassVar[tuple[Flag, ...]] = ()
    # the title of their group in psm train --help (default: "<name> executor")
    flag_group: ClassVar[str] = ""

    @classmethod
    def executor_name(cls) -> str:
        """The name this spec is registered under."""
        return spec_names(cls)[0]

    def with_flags(self, options: Mapping[str, Any]) -> Self:
        """This spec with the values of its flags in ``options`` (by flag dest, None: not
        given) applied; flags of other executors are ignored.

        Raises:
            ConfigError: a bad value, in one line naming the flag.
        """
        return apply_flags(self, options)

    @abstractmethod
    def build(self, config: RunConfig) -> Executor:
        """The executor these options describe, for a run of ``config`` (its torch threads
        come from ``config.train.threads``). Checks what it can before anything is written
        (an optional extra that is missing, a scheduler that is not here) with a one-line
        :class:`~psm.errors.PSMError`."""


# The fields of psm's earlier flat ``executor:`` section, which held the options of every
# executor beside the name; a config.yaml of a run made by then holds exactly one of these sets
# (the whole section was dumped), and may hold options of an executor it did not name.
FLAT_LAYOUTS = (
    frozenset({"name", "workers", "ensemble_size"}),
    frozenset({"name", "workers", "ensemble_size", "address", "local_cpus", "num_cpus",
               "num_gpus", "max_retries", "group_size", "lock_wait_s", "slurm"}),
)  # fmt: skip


class ExecutorRegistry(Registry[ExecutorSpec]):
    """The executor specs by name. Beyond :class:`~psm.spec.Registry`, it reads psm's earlier
    flat ``executor:`` section: an option of another executor is dropped where it has that
    executor's default value (or where the section is a whole flat dump,
    :data:`FLAT_LAYOUTS`), and is otherwise an error naming it."""

    def members(self) -> list[type[ExecutorSpec]]:
        """The spec classes, in the order of their names."""
        return list(dict.fromkeys(self.spec_class(n) for n in self.names()))

    def validate(self, raw: Any) -> ExecutorSpec:
        if isinstance(raw, dict):
            raw = self._own_options(raw)
        return super().validate(raw)

    def switch(self, raw: Any, name: str) -> Any:
        """A raw ``executor:`` section for running executor ``name`` in place of the one it
        names (``psm train --executor NAME``): the options both have carry over, the other
        options of the section's own executor are dropped, the rest is checked as usual.

        Raises:
            SpecError: ``name`` is not registered.
        """
        target = self.spec_class(name)
        if raw is None:
            return {"name": name}
        if not isinstance(raw, dict):
            return raw
        own = raw.get("name", self.default)
        source = self.spec_class(own) if isinstance(own, str) and own in self else None
        flat = frozenset(raw) in FLAT_LAYOUTS
        out: dict[str, Any] = {"name": name}
        for key, value in raw.items():
            theirs = flat or (source is not None and key in source.model_fields)
            if key != "name" and (key in target.model_fields or not theirs):
                out[key] = value
        return out

    def _own_options(self, raw: dict[str, Any]) -> dict[str, Any]:
        """``raw`` without the options of other executors that may be dropped (see the class)."""
        name = raw.get("name", self.default)
        if not isinstance(name, str) or name not in self:
            return raw  # Registry.validate says what is wrong with the name
        cls = self.spec_class(name)
        flat = frozenset(raw) in FLAT_LAYOUTS
        out = {}
        for key, value in raw.items():
            owners = [c for c in self.members() if key in c.model_fields]
            if key in cls.model_fields or not owners:
                out[key] = value  # its own, or no executor's (an error of its own)
            elif not flat and not any(_is_default(c, key, value) for c in owners):
                names = [c.executor_name() for c in owners]
                whose = f"the {names[0]} executor" if len(names) == 1 else (
                    f"the {', '.join(names[:-1])} and {names[-1]} executors")  # fmt: skip
                raise SpecError(key, f"an option of {whose}, not of {name}")
        return out


def _is_default(cls: type[ExecutorSpec], key: str, value: Any) -> bool:
    """Whether ``value`` is the default of ``cls``'s field ``key`` (after validation)."""
    try:
        given = cls.model_validate({key: value})
    except ValidationError:
        return False
    return getattr(given, key) == getattr(cls(), key)
