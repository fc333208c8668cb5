"""Strategy "subprocess": each rank is a fresh ``python -m accelcore_strategies.worker``
process, DDP over gloo with the rendezvous on 127.0.0.1, each rank pinned to its own cores."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

from accelcore_strategies.failures import RankFailure, read_failure, signal_cause
from accelcore_strategies.launchers.local import LocalLauncher
from accelcore_strategies.processes import Descendants, terminate_tree
from accelcore_strategies.rank import SPEC_FILE, WorkerSpec


class SubprocessLauncher(LocalLauncher):
    name = "subprocess"
    description = ("N local worker processes (own entry point), DDP/gloo over loopback, "
                   "disjoint cores per rank")

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
        below = Descendants()
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
