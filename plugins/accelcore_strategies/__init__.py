"""Built-in training strategies. This package ships "single" (one process); others register
their own names through the same ``accelcore_train`` hook and all call the core loop
``accelcore.training.loop.fit`` with their rank and world size."""

from __future__ import annotations

from accelcore import hookimpl
from accelcore.interfaces import Declaration, TrainJob

__version__ = "0.1.0"


@hookimpl
def accelcore_declare() -> list[Declaration]:
    return [Declaration("strategy", "single", "one process, all cores (torch intra-op threads)")]


@hookimpl
def accelcore_train(strategy: str, job: TrainJob) -> dict | None:
    if strategy != "single":
        return None
    from accelcore_strategies.single import run_single

    return run_single(job)


# Multi-process strategies, one module each; their hookimpls carry ``specname``, so importing
# them here adds them to this plugin (cheap: nothing heavy is imported until a run).
from accelcore_strategies.ray import declare_ray, train_ray  # noqa: E402,F401
from accelcore_strategies.spawn import declare_spawn, train_spawn  # noqa: E402,F401
from accelcore_strategies.subprocess import declare_subprocess, train_subprocess  # noqa: E402,F401
