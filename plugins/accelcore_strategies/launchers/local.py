"""What the launchers that start their own processes on this machine share.

- pick a free loopback rendezvous port (and start over on a fresh one if rank 0 still finds its
  port taken, since "free now" is no guarantee a moment later);
- give each rank a disjoint set of cores (``cores.plan_cores``) and optionally preload jemalloc
  or tcmalloc into the workers (``LD_PRELOAD`` only works for a process that is still to start);
- the first rank to fail ends the job at once: subclasses stop the others (SIGTERM, then
  SIGKILL) with their own children, and the error names the rank and the root cause.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelcore.errors import RecipeError
from accelcore_strategies.cores import plan_cores
from accelcore_strategies.failures import DistributedError, RankFailure, root_cause
from accelcore_strategies.launchers.base import Launcher, port_number, positive_number
from accelcore_strategies.rank import RESULT_FILE, WorkerSpec
from accelcore_strategies.rendezvous import (
    DEFAULT_TIMEOUT_S,
    LOOPBACK,
    Rendezvous,
    find_free_port,
    is_port_in_use_error,
    port_is_free,
)

log = logging.getLogger(__name__)


class PortTaken(Exception):
    """Rank 0 could not listen on the rendezvous port; the attempt is repeated on another."""


def port_from_environment() -> int | None:
    """``MASTER_PORT`` as torch's launchers read it, or None when unset."""
    value = os.environ.get("MASTER_PORT", "").strip()
    if not value:
        return None
    try:
        return port_number(int(value))
    except ValueError:
        raise RecipeError(f"MASTER_PORT: expected a port number 1-65535, got {value!r}") from None


class LocalLauncher(Launcher):
    """Start ``nprocs`` ranks on this machine, rendezvous over TCP on loopback.

    ``port``: preferred rendezvous port (``MASTER_PORT`` if unset; a busy one is replaced by a
    free one). ``timeout_s``: gloo collective timeout. ``bind_cores``: pin each rank to its own
    cores and size its thread pool to them.
    """

    options = {"port": port_number, "timeout_s": positive_number}

    def __init__(self, nprocs: int, *, allocator: str = "default",
                 malloc_tuning: bool = True, global_batch: int | None = None,
                 port: int | None = None,
                 addr: str = LOOPBACK, timeout_s: float = DEFAULT_TIMEOUT_S,
                 bind_cores: bool = True, poll_s: float = 0.1, grace_s: float = 3.0,
                 port_attempts: int = 3) -> None:
        super().__init__(nprocs, allocator=allocator, malloc_tuning=malloc_tuning,
                         global_batch=global_batch)
        self.env = self.runtime.env()  # fails here, before any process starts
        self.addr = addr
        self.port = port if port is not None else port_from_environment()
        self.timeout_s = timeout_s
        self.bind_cores = bind_cores
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.port_attempts = max(1, port_attempts)
        self.last_port: int | None = None  # the port the successful attempt used (tests)

    def launch(self, fn: Callable[[int, int], Any]) -> Any:
        print(f"accelcore: strategy {self.name}: {self.nprocs} process(es){self.batch_note()}, "
              f"allocator {self.allocator}", flush=True)
        cores = plan_cores(self.nprocs) if self.bind_cores else None
        root = tempfile.mkdtemp(prefix=f"accelcore-{self.name}-")
        try:
            for attempt in range(self.port_attempts):
                port = self._choose_port(first=attempt == 0)
                comm_dir = os.path.join(root, f"attempt{attempt}")
                os.makedirs(comm_dir)
                spec = WorkerSpec(fn=fn, world_size=self.nprocs,
                                  rendezvous=Rendezvous(self.addr, port, self.nprocs,
                                                        self.timeout_s),
                                  cores=cores, comm_dir=comm_dir, parent_pid=os.getpid())
                try:
                    self._run(spec)
                except PortTaken:
                    log.warning("rendezvous port %d was taken; retrying on another", port)
                    continue
                self.last_port = port
                return _read_result(comm_dir)
            raise DistributedError(f"strategy '{self.name}': no free rendezvous port after "
                                   f"{self.port_attempts} attempts")
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def _choose_port(self, first: bool) -> int:
        if first and self.port is not None:
            if port_is_free(self.port, self.addr):
                return self.port
            log.warning("rendezvous port %d is busy; using a free one", self.port)
        return find_free_port(self.addr)

    @abstractmethod
    def _run(self, spec: WorkerSpec) -> None:
        """Start every rank of ``spec``, wait for all, stop all on the first failure."""

    def _fail(self, failures: list[RankFailure], stopped: int) -> None:
        cause = root_cause(failures)
        if cause.rank == 0 and is_port_in_use_error(cause.cause):
            raise PortTaken()
        others = f"; stopped the other {stopped} rank(s)" if stopped else ""
        raise DistributedError(f"strategy '{self.name}': rank {cause.rank} failed: "
                               f"{cause.cause}{others}", cause)


def _read_result(comm_dir: str) -> Any:
    path = Path(comm_dir) / RESULT_FILE
    if not path.is_file():
        raise DistributedError("all ranks exited cleanly but rank 0 left no result")
    return pickle.loads(path.read_bytes())
