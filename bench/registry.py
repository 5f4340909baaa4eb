"""Registries: techniques, metrics and modifiers declare themselves; everything else reads the declarations.

A technique (or metric, or modifier) is one module in its package with a `@TECHNIQUES.register` (etc.)
class. `discover()` imports every module of the package, so adding one needs no edit anywhere else: the CLI
flags, the CSV schema, the README tables and the report's labels all derive from the declared `Axis` and
`Column` objects.
"""

from __future__ import annotations

import contextlib
import pkgutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Generic, Literal, TypeVar

from stable_diffusion.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class Axis:
    """One sweep axis: CLI flag `--<name>` (a `_` becomes `-`) and TOML key, its default values and parser."""

    name: str
    default: list[Any]
    parse: Callable[[Any], Any]  # one value (a CLI string or a TOML value) -> the parameter value
    help: str
    choices: Sequence[Any] | None = None

    @property
    def flag(self) -> str:
        return f"--{self.name.replace('_', '-')}"

    def check(self, value: Any) -> Any:
        """One value parsed and checked against `choices`; InputError names the axis and the choices."""
        try:
            parsed = self.parse(value)
        except (TypeError, ValueError):
            raise InputError(f"bad value {value!r} for {self.flag}") from None
        except InputError as e:
            raise InputError(f"{self.name}: {e}") from None
        if self.choices is not None and parsed not in self.choices:
            raise InputError(f"unknown {self.name} {parsed!r}; choose from: {', '.join(map(str, self.choices))}")
        return parsed

    def values(self, raw: Any) -> list[Any]:
        """One value or a comma list (CLI) or a list (TOML), each checked."""
        items = raw if isinstance(raw, list) else str(raw).split(",")
        return [self.check(v) for v in items]


@dataclass(frozen=True)
class Column:
    """One results.csv column: its meaning (README), plot label, direction and CI columns.

    `plot=False` marks columns that describe a row rather than measure it (knobs, counts, CI bounds).
    `scale` is applied before plotting (bytes -> MB: label says the unit).
    """

    name: str
    meaning: str
    label: str | None = None
    better: Literal["higher", "lower"] | None = None
    ci: tuple[str, str] | None = None  # (low, high) column names of this column's confidence interval
    plot: bool = True
    scale: float = 1.0

    @property
    def axis_label(self) -> str:
        return self.label or self.name


def positive_int(value: Any) -> int:
    """An integer >= 1 (from a CLI string or a TOML int)."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise InputError(f"expected a positive integer, got {value!r}")
    return int(text)


def text(value: Any) -> str:
    """A string choice (from a CLI string or a TOML string)."""
    if not isinstance(value, str):
        raise TypeError(value)
    return value.strip()


class Registry(Generic[T]):
    """Named classes of one kind, ordered by their `order` then name; `discover()` imports a package."""

    def __init__(self, kind: str, package: str | None = None) -> None:
        self.kind = kind
        self.package = package
        self._classes: dict[str, type[T]] = {}
        self._discovered = False

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator. A second class under a taken name is a programming error."""
        name = cls.name  # type: ignore[attr-defined]
        if self._classes.get(name, cls) is not cls:
            raise ValueError(f"{self.kind} {name!r} registered twice ({self._classes[name]} and {cls})")
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        self._classes.pop(name, None)

    @contextlib.contextmanager
    def temporarily(self, *classes: type[T]) -> Iterator[None]:
        """Register `classes` for the duration of a `with` block (tests: toy techniques and metrics)."""
        for cls in classes:
            self.register(cls)
        try:
            yield
        finally:
            for cls in classes:
                self.unregister(cls.name)  # type: ignore[attr-defined]

    def discover(self) -> None:
        """Import every module (and subpackage) of the package once, so their decorators run."""
        if self._discovered or self.package is None:
            return
        self._discovered = True
        package = import_module(self.package)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{self.package}."):
            if not info.name.rpartition(".")[2].startswith("_"):
                import_module(info.name)

    def names(self) -> list[str]:
        self.discover()
        return [cls.name for cls in self.classes()]  # type: ignore[attr-defined]

    def classes(self) -> list[type[T]]:
        self.discover()
        return sorted(self._classes.values(), key=lambda c: (getattr(c, "order", 100), c.name))  # type: ignore[attr-defined]

    def get(self, name: str) -> type[T]:
        self.discover()
        if name not in self._classes:
            raise InputError(f"unknown {self.kind} {name!r}; choose from: {', '.join(self.names())}")
        return self._classes[name]

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._classes


TECHNIQUES: Registry[Any] = Registry("technique", "bench.techniques")
METRICS: Registry[Any] = Registry("metric", "bench.metrics")
MODIFIERS: Registry[Any] = Registry("modifier", "bench.modifiers")
