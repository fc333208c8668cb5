"""Launchers: start N local worker processes, watch them, tear everything down.

Kept apart from the strategies (as in Lightning Fabric): a strategy decides *what* each rank runs
(``ddp.fit_job``), a launcher decides *how* the processes come and go. Both launchers here:

- pick a free loopback rendezvous port (and start over on a fresh one if rank 0 still finds
  its port taken, since "free now" is no guarantee a moment later);
- give each rank a disjoint set of cores (``ddp.plan_cores``) and optionally preload jemalloc or
  tcmalloc into the workers (``LD_PRELOAD`` only works for a process that is still to start);
- poll the workers: the first one to fail ends the job at once. The others are stopped (SIGTERM,
  then SIGKILL), with their own children, and the error names the rank and the root cause, not
  the "connection closed by peer" the survivors see afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from accelcore.errors import AccelcoreError
from accelcore.runtime import allocator_env
from accelcore_strategies.ddp import (
    DEFAULT_TIMEOUT_S,
    LOOPBACK,
    RESULT_FILE,
    SPEC_FILE,
    RankFailure,
    Rendezvous,
    WorkerSpec,
    find_free_port,
    fit_job,
    is_port_in_use_error,
    plan_cores,
    port_is_free,
    read_failure,
    root_cause,
    run_rank,
    signal_cause,
)

log = logging.getLogger(__name__)


class DistributedError(AccelcoreError):
    """A multi-process run failed; the message names the rank and the cause on one line."""

    def __init__(self, message: str, failure: RankFailure | None = None) -> None:
        super().__init__(message)
        self.failure = failure


# ---------------------------------------------------------------- process teardown


def terminate_tree(pids: list[int], grace_s: float) -> None:
    """SIGTERM ``pids`` and everything below them, SIGKILL what is left after ``grace_s``.

    Callers pass only processes they have not reaped yet, so a pid cannot have been reused.
    """
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            procs.update({c.pid: c for c in proc.children(recursive=True)})
            procs[pid] = proc
    _stop(list(procs.values()), grace_s)


def _stop(procs: list[psutil.Process], grace_s: float) -> None:
    alive = [p for p in procs if _alive(p)]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class _Descendants:
    """Remembers every process below the workers (e.g. DataLoader workers), so those are
    stopped too even if their parent rank is already gone when the job ends."""

    def __init__(self) -> None:
        self.seen: dict[int, psutil.Process] = {}
        self._last = 0.0

    def scan(self, pids: list[int], every_s: float = 1.0) -> None:
        now = time.monotonic()
        if now - self._last < every_s:
            return
        self._last = now
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(pid).children(recursive=True):
                    self.seen.setdefault(child.pid, child)

    def stop(self, grace_s: float) -> None:
        _stop(list(self.seen.values()), grace_s)


# ---------------------------------------------------------------- launchers


class _PortTaken(Exception):
    """Rank 0 could not listen on the rendezvous port; the attempt is repeated on another."""


class Launcher:
    """Start ``nprocs`` ranks of ``fn(rank, world_size)`` on this machine; return rank 0's result.

    ``port``: preferred rendezvous port (a busy one is replaced by a free one).
    ``bind_cores``: pin each rank to its own cores and size its thread pool to them.
    """

    name = "launcher"

    def __init__(self, nprocs: int, *, port: int | None = None, addr: str = LOOPBACK,
                 timeout_s: float = DEFAULT_TIMEOUT_S, allocator: str = "default",
                 bind_cores: bool = True, poll_s: float = 0.1, grace_s: float = 3.0,
                 port_attempts: int = 3) -> None:
        if nprocs < 1:
            raise ValueError(f"nprocs must be >= 1, got {nprocs}")
        self.nprocs = nprocs
        self.addr = addr
        self.port = port
        self.timeout_s = timeout_s
        self.env = allocator_env(allocator)  # fails here, before any process starts
        self.allocator = allocator
        self.bind_cores = bind_cores
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.port_attempts = max(1, port_attempts)
        self.last_port: int | None = None  # the port the successful attempt used (tests)

    def launch(self, fn: Callable[[int, int], Any]) -> Any:
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
                except _PortTaken:
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

    def _run(self, spec: WorkerSpec) -> None:
        raise NotImplementedError

    def _fail(self, failures: list[RankFailure], stopped: int) -> None:
        cause = root_cause(failures)
        if cause.rank == 0 and is_port_in_use_error(cause.cause):
            raise _PortTaken()
        others = f"; stopped the other {stopped} rank(s)" if stopped else ""
        raise DistributedError(f"strategy '{self.name}': rank {cause.rank} failed: "
                               f"{cause.cause}{others}", cause)

    @contextlib.contextmanager
    def _environment(self) -> Iterator[None]:
        """Temporarily export the worker environment (for start methods that inherit it)."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _read_result(comm_dir: str) -> Any:
    path = Path(comm_dir) / RESULT_FILE
    if not path.is_file():
        raise DistributedError("all ranks exited cleanly but rank 0 left no result")
    return pickle.loads(path.read_bytes())


class SubprocessLauncher(Launcher):
    """Each rank is a fresh ``python -m accelcore_strategies.worker`` process."""

    name = "subprocess"

    def _worker_env(self, rank: int, spec: WorkerSpec) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        # The worker must import what the launcher can (test modules, --plugin modules from the
        # working directory), as multiprocessing's spawn does by sending its sys.path.
        base = (sys.prefix, sys.base_prefix, sys.exec_prefix)
        extra = [p or os.getcwd() for p in sys.path if not (p and p.startswith(base))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
            extra + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
        env["PYTHONUNBUFFERED"] = "1"
        if spec.cores is not None:
            # Sized before the OpenMP runtime starts, not only by torch.set_num_threads later.
            env["OMP_NUM_THREADS"] = str(len(spec.cores[rank]))
        return env

    def _run(self, spec: WorkerSpec) -> None:
        (Path(spec.comm_dir) / SPEC_FILE).write_bytes(pickle.dumps(spec))
        procs: list[subprocess.Popen] = []
        below = _Descendants()
        try:
            for rank in range(self.nprocs):
                cmd = [sys.executable, "-m", "accelcore_strategies.worker", spec.comm_dir,
                       str(rank)]
                procs.append(subprocess.Popen(cmd, env=self._worker_env(rank, spec)))
            while True:
                codes = [p.poll() for p in procs]
                if any(c not in (None, 0) for c in codes):
                    self._on_failure(procs, spec)
                if all(c == 0 for c in codes):
                    return
                below.scan([p.pid for p in procs])
                time.sleep(self.poll_s)
        finally:
            terminate_tree([p.pid for p in procs if p.poll() is None], self.grace_s)
            for p in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=self.grace_s)
            below.stop(self.grace_s)

    def _on_failure(self, procs: list[subprocess.Popen], spec: WorkerSpec) -> None:
        # Let the survivors' own errors (lost peer) land, but do not wait on busy ranks long.
        deadline = time.monotonic() + min(0.5, self.grace_s)
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(self.poll_s / 2)
        failures = []
        for rank, proc in enumerate(procs):
            code = proc.poll()
            if code not in (None, 0):
                failures.append(read_failure(spec.comm_dir, rank)
                                or RankFailure(rank, signal_cause(code)))
        stopped = sum(p.poll() is None for p in procs)
        self._fail(failures, stopped)


def _spawn_entry(index: int, spec: WorkerSpec) -> None:
    try:
        run_rank(spec, index)
    except BaseException:
        # torch's wrapper keeps the traceback for the parent only; print it like subprocess does
        traceback.print_exc()
        sys.stderr.flush()
        raise


class SpawnLauncher(Launcher):
    """Ranks started by ``torch.multiprocessing.start_processes`` (start method "spawn")."""

    name = "spawn"

    def _run(self, spec: WorkerSpec) -> None:
        import torch.multiprocessing as tmp
        from torch.multiprocessing.spawn import ProcessException

        below = _Descendants()
        with self._environment():
            context = tmp.start_processes(_spawn_entry, args=(spec,), nprocs=self.nprocs,
                                          join=False, start_method="spawn")
        pids = [p.pid for p in context.processes]
        try:
            # join() itself stops the others after the first failure (grace, SIGTERM, SIGKILL).
            while not context.join(timeout=self.poll_s, grace_period=min(0.5, self.grace_s)):
                below.scan(pids)
        except ProcessException as exc:
            self._on_failure(context, spec, exc.error_index)
        finally:
            terminate_tree([p.pid for p in context.processes if p.is_alive()], self.grace_s)
            below.stop(self.grace_s)

    def _on_failure(self, context: Any, spec: WorkerSpec, first: int) -> None:
        import signal

        failures, stopped = [], 0
        for rank, proc in enumerate(context.processes):
            code = proc.exitcode
            recorded = read_failure(spec.comm_dir, rank)
            if recorded is not None:
                failures.append(recorded)
            elif rank == first or code not in (None, 0, -signal.SIGTERM):
                cause = signal_cause(code if code is not None else 1)
                if code == 1:  # failed before run_rank: usually the child re-importing __main__
                    cause += (" before starting (spawn re-imports the main script: guard it "
                              "with if __name__ == '__main__'; see the traceback above)")
                failures.append(RankFailure(rank, cause))
            elif code is not None and code != 0:  # stopped by join() after the first failure
                stopped += 1
        self._fail(failures, stopped)


# ---------------------------------------------------------------- strategies' entry


def train_with(launcher_cls: type[Launcher], job: Any) -> dict:
    """Run ``fit`` on ``train.num_processes`` local ranks started by ``launcher_cls``.

    ``job.extra`` may carry ``master_port`` (preferred rendezvous port; ``MASTER_PORT`` from the
    environment otherwise) and ``dist_timeout_s`` (gloo collective timeout).
    """
    cfg = job.recipe.train
    port = job.extra.get("master_port", os.environ.get("MASTER_PORT"))
    launcher = launcher_cls(cfg.num_processes, port=int(port) if port else None,
                            timeout_s=float(job.extra.get("dist_timeout_s", DEFAULT_TIMEOUT_S)),
                            allocator=cfg.allocator)
    print(f"accelcore: strategy {launcher.name}: {cfg.num_processes} process(es), global batch "
          f"{cfg.batch_size} = {cfg.batch_size // cfg.num_processes} per rank, allocator "
          f"{cfg.allocator}", flush=True)
    return launcher.launch(functools.partial(fit_job, job))
