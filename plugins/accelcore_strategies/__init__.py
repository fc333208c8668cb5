"""Built-in training strategies, each a ``Launcher`` (``launchers/``): "single" (this process),
"subprocess" and "spawn" (local processes, DDP over loopback) and "ray" (Ray Train workers,
locally or on a cluster). The core hands ``accelcore_launch`` the function every rank runs;
this plugin looks the strategy up in ``LAUNCHERS`` and lets that launcher run it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from accelcore import hookimpl
from accelcore.interfaces import Declaration
from accelcore_strategies.launchers import LAUNCHERS

__version__ = "0.1.0"


@hookimpl
def accelcore_declare() -> list[Declaration]:
    return [launcher_cls.declaration() for launcher_cls in LAUNCHERS.values()]


@hookimpl
def accelcore_launch(strategy: str, fn: Callable[[int, int], Any], nprocs: int,
                     recipe: Any) -> Any:
    launcher_cls = LAUNCHERS.get(strategy)
    if launcher_cls is None:
        return None
    return launcher_cls.from_recipe(nprocs, recipe).launch(fn)
