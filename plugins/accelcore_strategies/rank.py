"""What one rank of a multi-process launcher does around the function it was given.

Pin the process to its cores, join the gloo group, run ``fn(rank, world_size)`` (the core's
training loop, a benchmark step, …), record a failure as one line for the launcher, hand rank 0's
result back, and leave the group again. Shared by every launcher that starts processes.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelcore.runtime import apply_inherited_setup, loaded_allocator
from accelcore_strategies.cores import bind_to_cores
from accelcore_strategies.failures import write_failure
from accelcore_strategies.rendezvous import Rendezvous, destroy_process_group, init_process_group

SPEC_FILE = "spec.pkl"
RESULT_FILE = "result.pkl"


@dataclass
class WorkerSpec:
    """What one local process runs; pickled for subprocess/spawn workers."""

    fn: Callable[[int, int], Any]  # (rank, world_size) -> result; must be picklable
    world_size: int
    rendezvous: Rendezvous | None  # None: the group is set up by the launcher (Ray Train)
    cores: list[list[int]] | None  # per local rank; None: no pinning
    comm_dir: str | None  # error files and rank 0's result; None: return the result only
    parent_pid: int | None = None  # set: die with this launcher process (subprocess/spawn)


def run_rank(spec: WorkerSpec, rank: int, local_rank: int | None = None) -> Any:
    """Pin, join the group, run ``spec.fn(rank, world_size)``, leave; failures are recorded."""
    local_rank = rank if local_rank is None else local_rank
    apply_inherited_setup()  # the launcher's allocator tuning, in force before any work
    if spec.parent_pid is not None:
        _die_with_parent(spec.parent_pid)
    try:
        if spec.cores is not None:
            cpus = spec.cores[local_rank]
            threads = bind_to_cores(cpus)
            print(f"rank {rank}: cores {cpus} threads {threads} allocator {loaded_allocator()}",
                  flush=True)
        init_process_group(rank, spec.rendezvous)
        try:
            result = spec.fn(rank, spec.world_size)
        finally:
            destroy_process_group()
    except BaseException as exc:
        if spec.comm_dir is not None:
            write_failure(spec.comm_dir, rank, exc)
        raise
    if rank == 0 and spec.comm_dir is not None:
        tmp = Path(spec.comm_dir) / (RESULT_FILE + ".tmp")
        tmp.write_bytes(pickle.dumps(result))
        tmp.replace(Path(spec.comm_dir) / RESULT_FILE)
    return result


def _die_with_parent(parent_pid: int) -> None:
    """Linux: get SIGKILL when the launcher dies, so a killed launcher leaves no orphans."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the launcher died before prctl took effect
        os._exit(1)
