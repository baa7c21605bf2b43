"""How an executor's options become ``psm train`` flags.

Each executor's spec lists its flags beside its code (``RaySpec.flags`` in :mod:`.ray`,
``SlurmSpec.flags`` in :mod:`.slurm`, ...); a flag overrides one field of the spec
(``--num-cpus`` is ``executor.num_cpus``, ``--slurm-partition`` is ``executor.slurm.partition``).
This module holds what they share: the :class:`Flag` record, the flags of more than one
executor (``--workers``, ``--max-stack``), adding every registered executor's flags to a parser,
and applying the given ones to a spec.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from ..errors import ConfigError

if TYPE_CHECKING:
    from .base import ExecutorSpec

S = TypeVar("S", bound="ExecutorSpec")


class Flag:
    """A ``psm train`` flag that overrides one option of an executor's spec.

    Args:
        flag: the flag, e.g. ``--num-cpus``.
        field: the spec field it sets, dotted inside a sub-section (``slurm.time_min``); None
            for a flag the spec reads itself (ray's ``--workers`` sizes a local Ray).
        help: the help line.
        dest: the argparse destination, which is also the key of the flag's value in
            :func:`psm.executors.make_executor`'s options (default: from the flag,
            ``--num-cpus`` -> ``num_cpus``).
        kwargs: more :meth:`argparse.ArgumentParser.add_argument` keywords (``type``,
            ``metavar``, ``choices``, ``action``, ...).
    """

    def __init__(
        self, flag: str, field: str | None, help: str, *, dest: str | None = None, **kwargs: Any
    ) -> None:
        self.flag = flag
        self.field = field
        self.help = help
        self.dest = dest or flag.lstrip("-").replace("-", "_")
        self.kwargs = kwargs

    def setting(self, field: str | None) -> Flag:
        """The same flag setting another field (None: read by the spec itself)."""
        return Flag(self.flag, field, self.help, dest=self.dest, **self.kwargs)

    def __repr__(self) -> str:
        return f"Flag({self.flag!r} -> {self.field})"


# flags of more than one executor
WORKERS = Flag("--workers", "workers", "worker processes", type=int)
MAX_STACK = Flag(
    "--max-stack",
    "ensemble_size",
    "most blocks stacked at once (default: 16 on a CPU, all on a GPU)",
    type=int,
)


def _members(specs: Iterable[type[ExecutorSpec]] | None) -> list[type[ExecutorSpec]]:
    if specs is not None:
        return list(specs)
    from . import EXECUTORS

    return EXECUTORS.members()


def add_executor_arguments(
    parser: argparse.ArgumentParser, specs: Iterable[type[ExecutorSpec]] | None = None
) -> None:
    """Add the flags of every registered executor (or of ``specs``) to ``parser``.

    A flag that several executors share (``--workers``) goes to the parser itself, its help
    naming them; the others go to a group per executor (its spec's ``flag_group``).
    """
    members = _members(specs)
    users: dict[str, list[str]] = {}
    flags: dict[str, Flag] = {}
    for cls in members:
        for f in cls.flags:
            flags.setdefault(f.dest, f)
            users.setdefault(f.dest, []).append(cls.executor_name())
    for dest, f in flags.items():
        if len(users[dest]) > 1:
            help = f"{f.help} ({', '.join(users[dest])})"
            parser.add_argument(f.flag, dest=dest, help=help, **f.kwargs)
    for cls in members:
        own = [f for f in cls.flags if len(users[f.dest]) == 1]
        if not own:
            continue
        title = cls.flag_group or f"{cls.executor_name()} executor"
        group = parser.add_argument_group(title)
        for f in own:
            group.add_argument(f.flag, dest=f.dest, help=f.help, **f.kwargs)


def flag_values(
    args: argparse.Namespace, specs: Iterable[type[ExecutorSpec]] | None = None
) -> dict[str, Any]:
    """The executor flags given on the command line, by dest (flags not given are left out)."""
    out: dict[str, Any] = {}
    for cls in _members(specs):
        for f in cls.flags:
            value = getattr(args, f.dest, None)
            if value is not None:
                out[f.dest] = value
    return out


def apply_flags(spec: S, options: Mapping[str, Any]) -> S:
    """A copy of ``spec`` with the values of its flags in ``options`` (by dest; None: not
    given) set and validated; flags of other executors are ignored.

    Raises:
        ConfigError: one line naming the flag, e.g. ``--num-cpus: Input should be greater
            than 0``.
    """
    raw = spec.model_dump()
    by_field: dict[str, str] = {}
    changed = False
    for f in spec.flags:
        value = options.get(f.dest)
        if value is None or f.field is None:
            continue
        *path, last = f.field.split(".")
        node = raw
        for part in path:
            node = node[part]
        node[last] = value
        by_field[f.field] = f.flag
        changed = True
    if not changed:
        return spec
    try:
        return type(spec).model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        where = by_field.get(loc) or (f"executor.{loc}" if loc else "executor")
        raise ConfigError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
