"""The single-process strategy: the core loop as rank 0 of a world of 1."""

from __future__ import annotations

from accelcore.errors import RecipeError
from accelcore.interfaces import TrainJob


def run_single(job: TrainJob) -> dict:
    n = job.recipe.train.num_processes
    if n != 1:
        raise RecipeError(f"train.num_processes: strategy 'single' runs one process, got {n}; "
                          "use train.strategy: subprocess/spawn/ray for several")
    from accelcore.training.loop import fit

    return fit(job, rank=0, world_size=1)
