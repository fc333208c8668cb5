"""Strategy "spawn": ``train.num_processes`` ranks started by ``torch.multiprocessing`` (start
method "spawn"), DDP over gloo on 127.0.0.1, each rank pinned to its own cores. The ranks run
the core loop ``fit`` unchanged."""

from __future__ import annotations

from accelcore import hookimpl
from accelcore.interfaces import Declaration, TrainJob

NAME = "spawn"


# specname: this module's hooks join the package plugin beside the other strategies' ones.
@hookimpl(specname="accelcore_declare")
def declare_spawn() -> list[Declaration]:
    return [Declaration("strategy", NAME, "N local processes via torch.multiprocessing.spawn, "
                        "DDP/gloo over loopback, disjoint cores per rank")]


@hookimpl(specname="accelcore_train")
def train_spawn(strategy: str, job: TrainJob) -> dict | None:
    if strategy != NAME:
        return None
    from accelcore_strategies.launcher import SpawnLauncher, train_with

    return train_with(SpawnLauncher, job)
