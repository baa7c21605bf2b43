"""Typed config sections and the registries of self-building parts.

A *part* (a dataset, a net) is described in the config by a small pydantic model — a *spec* —
that lives next to the code it builds and knows how to build it. The config's ``data:`` and
``net:`` sections are discriminated by ``name``: the registry maps each name to its spec class,
so adding a net or a dataset is its own file plus one registry line, and nothing in
:mod:`psm.runs.config`.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    """A config section: unknown fields are errors, assignments are validated, and a float is
    never NaN or infinite (``lr: .inf`` is refused)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Spec(Section):
    """A registered config member: a ``name`` literal picks the class in its registry."""

    name: str

    # the field that is never left out of the config hash (it says which member this is)
    discriminator: ClassVar[str] = "name"


S = TypeVar("S", bound=Spec)


class SpecError(ValueError):
    """A spec that does not validate; ``loc`` is the field inside the member (may be empty)."""

    def __init__(self, loc: str, message: str) -> None:
        super().__init__(message)
        self.loc = loc
        self.message = message


def spec_names(cls: type[Spec]) -> tuple[str, ...]:
    """The names a spec class answers to (the values of its ``name: Literal[...]`` field)."""
    ann = cls.model_fields["name"].annotation
    if typing.get_origin(ann) is not typing.Literal:
        raise TypeError(f"{cls.__name__}.name must be a Literal of the names it answers to")
    return tuple(str(a) for a in typing.get_args(ann))


class Registry(Generic[S]):
    """Spec classes by name; validates a raw mapping into the member its ``name`` picks.

    Args:
        what: what the members are (``"dataset"``, ``"net"``), for error messages.
        members: the spec classes.
        default: the name assumed when a mapping gives none.
    """

    def __init__(
        self, what: str, members: Iterable[type[S]] = (), *, default: str | None = None
    ) -> None:
        self.what = what
        self.default = default
        self._by_name: dict[str, type[S]] = {}
        for cls in members:
            self.register(cls)

    def register(self, cls: type[S]) -> type[S]:
        """Add a spec class (usable as a decorator); its names must be new."""
        for name in spec_names(cls):
            if name in self._by_name and self._by_name[name] is not cls:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._by_name[name] = cls
        return cls

    def unregister(self, cls: type[S]) -> None:
        """Remove a spec class (tests register throwaway members)."""
        for name in spec_names(cls):
            self._by_name.pop(name, None)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def spec_class(self, name: str) -> type[S]:
        """The class registered under ``name``."""
        if name not in self._by_name:
            raise SpecError(
                "name", f"unknown {self.what} {name!r} (choose from {', '.join(self.names())})"
            )
        return self._by_name[name]

    def validate(self, raw: Any) -> S:
        """A spec from a raw mapping (or an existing spec instance).

        Raises:
            SpecError: unknown name, or a field that does not validate (``loc`` names it).
        """
        if isinstance(raw, Spec):
            self.spec_class(raw.name)
            return raw  # type: ignore[return-value]
        if not isinstance(raw, dict):
            raise SpecError("", f"expected a mapping, got {type(raw).__name__}")
        name = raw.get("name", self.default)
        if not isinstance(name, str):
            raise SpecError("name", f"{self.what} name is required (choose from "
                                    f"{', '.join(self.names())})")  # fmt: skip
        cls = self.spec_class(name)
        try:
            return cls.model_validate({**raw, "name": name})
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
            raise SpecError(loc, msg + more) from None


F = TypeVar("F", bound=Callable[..., Any])


class Builders(Generic[F]):
    """Builder functions by name, for a config section that stays one class whose ``name`` or
    ``kind`` field picks how it is built (a process, a partition): the section's fields, names
    and defaults are hashed as they are, and a new member is one builder and one registration.

    Args:
        what: what the members are (``"process"``), for error messages.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._by_name: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """A decorator adding a builder under ``name`` (which must be new)."""

        def add(fn: F) -> F:
            if name in self._by_name and self._by_name[name] is not fn:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._by_name[name] = fn
            return fn

        return add

    def unregister(self, name: str) -> None:
        """Remove a builder (tests register throwaway members)."""
        self._by_name.pop(name, None)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def check(self, name: str) -> str:
        """``name`` if it is registered (a field validator), else a one-line ValueError."""
        if name not in self._by_name:
            raise ValueError(
                f"unknown {self.what} {name!r} (choose from {', '.join(self.names())})"
            )
        return name

    def get(self, name: str) -> F:
        """The builder registered under ``name`` (unknown: a one-line ValueError)."""
        return self._by_name[self.check(name)]


def canonical(spec: BaseModel) -> dict[str, Any]:
    """The fields of a section that define a problem, for hashing: every field whose value
    differs from its default, plus the discriminator (``name``/``kind``), as JSON values.

    Leaving defaults out means a new option (with a default that keeps the old behaviour) never
    changes the hash of an existing run.
    """
    dump = spec.model_dump(mode="json")
    keep = {getattr(spec, "discriminator", "name"), "name", "kind"}
    out = {}
    for key, field in type(spec).model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        value = dump[key]
        if key in keep or value != _json(default):
            out[key] = value
    return out


def _json(value: Any) -> Any:
    """A default value as it appears in a JSON dump (tuples become lists)."""
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value
