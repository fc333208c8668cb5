"""Running a function on the processes of a strategy: the core's side of ``accelcore_launch``.

The core never knows how a strategy starts its ranks; it hands the plugin that declared the
strategy a picklable ``fn(rank, world_size)`` (the training loop, a benchmark step, …) and gets
rank 0's return value back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from accelcore.errors import PluginError
from accelcore.plugins import PluginManager


def launch(pm: PluginManager, recipe: Any, fn: Callable[[int, int], Any], nprocs: int,
           strategy: str | None = None, key: str = "train.strategy") -> Any:
    """Run ``fn`` on ``nprocs`` ranks of ``strategy`` (default ``recipe.train.strategy``) and
    return rank 0's result. ``key`` names where the strategy came from in the error raised
    when no plugin ran it."""
    name = recipe.train.strategy if strategy is None else strategy
    boxed = pm.hook.accelcore_launch(strategy=name, fn=functools.partial(_boxed, fn),
                                     nprocs=nprocs, recipe=recipe)
    if boxed is None:
        declared = ", ".join(pm.names("strategy")) or "none"
        raise PluginError(f"{key}: no plugin ran strategy '{name}'; declared: {declared}")
    return boxed[0]


def _boxed(fn: Callable[[int, int], Any], rank: int, world_size: int) -> tuple[Any]:
    # ``None`` from the hook means "not my strategy", so rank 0's result travels in a 1-tuple:
    # a function that returns None is still told apart from a strategy nobody ran.
    return (fn(rank, world_size),)
