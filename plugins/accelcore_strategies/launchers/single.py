"""Strategy "single": the function runs in this process as rank 0 of a world of 1, on all the
cores torch's intra-op pool is given (``train.threads``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from accelcore.errors import RecipeError
from accelcore.runtime import require_allocator
from accelcore_strategies.launchers.base import Launcher


class SingleLauncher(Launcher):
    name = "single"
    description = "one process, all cores (torch intra-op threads)"

    def launch(self, fn: Callable[[int, int], Any]) -> Any:
        if self.nprocs != 1:
            raise RecipeError(f"train.num_processes: strategy 'single' runs one process, got "
                              f"{self.nprocs}; choose a multi-process train.strategy "
                              "(accelcore list-plugins shows them)")
        # The accelcore command restarted itself with the allocator preloaded before the run;
        # a caller from Python cannot be restarted and is told how instead.
        require_allocator(self.allocator, None)
        return fn(0, 1)
