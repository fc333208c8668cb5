"""Strategy "subprocess": ``train.num_processes`` fresh worker processes of our own entry point
(``python -m accelcore_strategies.worker``), DDP over gloo with the rendezvous on 127.0.0.1,
each rank pinned to its own cores. The ranks run the core loop ``fit`` unchanged."""

from __future__ import annotations

from accelcore import hookimpl
from accelcore.interfaces import Declaration, TrainJob

NAME = "subprocess"


# specname: this module's hooks join the package plugin beside the other strategies' ones.
@hookimpl(specname="accelcore_declare")
def declare_subprocess() -> list[Declaration]:
    return [Declaration("strategy", NAME, "N local worker processes (own entry point), DDP/gloo "
                        "over loopback, disjoint cores per rank")]


@hookimpl(specname="accelcore_train")
def train_subprocess(strategy: str, job: TrainJob) -> dict | None:
    if strategy != NAME:
        return None
    from accelcore_strategies.launcher import SubprocessLauncher, train_with

    return train_with(SubprocessLauncher, job)
