"""The contract every strategy of this plugin implements: a ``Launcher`` (Lightning Fabric's
shape). A launcher decides *how* the ranks come and go; *what* each rank runs is the function
the core hands over through ``accelcore_launch`` (the training loop, a benchmark step, …).

A launcher class names its strategy (``name``), describes it for ``accelcore list-plugins``,
says whether it can run here, and lists the keys it accepts under
``train.options.<name>`` with a converter each; ``from_recipe`` checks those keys and builds it.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from accelcore.errors import RecipeError
from accelcore.interfaces import Declaration
from accelcore.runtime import RuntimeSetup

#: A converter turns a recipe value into the launcher's argument, or raises ValueError saying
#: what it expected.
Converter = Callable[[Any], Any]


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected an integer >= 1")
    return value


def positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError("expected a number > 0")
    return float(value)


def port_number(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError("expected a port number 1-65535")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value


class Launcher(ABC):
    """Runs ``fn(rank, world_size)`` on ``nprocs`` ranks and returns rank 0's result."""

    name: ClassVar[str]  # the train.strategy value
    description: ClassVar[str]
    options: ClassVar[dict[str, Converter]] = {}  # train.options.<name>.<key> -> converter

    def __init__(self, nprocs: int, *, allocator: str = "default", malloc_tuning: bool = True,
                 global_batch: int | None = None) -> None:
        if nprocs < 1:
            raise ValueError(f"nprocs must be >= 1, got {nprocs}")
        self.nprocs = nprocs
        self.allocator = allocator
        # Every worker starts under the project's one runtime setup; threads are sized per
        # rank by core pinning, not here.
        self.runtime = RuntimeSetup(allocator=allocator, malloc_tuning=malloc_tuning)
        self.global_batch = global_batch  # only for the start-up line

    @classmethod
    def unavailable_reason(cls) -> str:
        """Why this strategy cannot run here ('' if it can); must not import heavy packages."""
        return ""

    @classmethod
    def declaration(cls) -> Declaration:
        reason = cls.unavailable_reason()
        return Declaration("strategy", cls.name, cls.description, available=not reason,
                           reason=reason)

    @classmethod
    def from_recipe(cls, nprocs: int, recipe: Any) -> Launcher:
        """The launcher for ``recipe``: its allocator and its ``train.options.<name>``."""
        return cls(nprocs, allocator=recipe.train.allocator,
                   malloc_tuning=recipe.train.malloc_tuning,
                   global_batch=recipe.train.batch_size, **read_options(cls, recipe))

    @abstractmethod
    def launch(self, fn: Callable[[int, int], Any]) -> Any:
        """Run ``fn`` on every rank; return rank 0's result or raise one clear error."""

    def batch_note(self) -> str:
        if self.global_batch is None:
            return ""
        return (f", global batch {self.global_batch} = {self.global_batch // self.nprocs} "
                "per rank")


def read_options(cls: type[Launcher], recipe: Any) -> dict[str, Any]:
    """``train.options.<cls.name>`` converted to keyword arguments; a bad key or value is one
    line naming ``train.options.<name>.<key>``. A null value leaves the launcher's default."""
    source = getattr(recipe, "source", "<dict>")
    where = f"train.options.{cls.name}"
    raw = recipe.train.options.get(cls.name) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {where}: expected a mapping of options, got {raw!r}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        convert = cls.options.get(key)
        if convert is None:
            close = difflib.get_close_matches(str(key), list(cls.options), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            known = ", ".join(sorted(cls.options)) or "none"
            raise RecipeError(f"{source}: {where}.{key}: unknown option of strategy "
                              f"'{cls.name}'{hint}; known: {known}")
        if value is None:
            continue
        try:
            kwargs[key] = convert(value)
        except ValueError as exc:
            raise RecipeError(f"{source}: {where}.{key}: {exc}, got {value!r}") from None
    return kwargs
