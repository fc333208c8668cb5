"""Strategy "spawn": ranks started by ``torch.multiprocessing.start_processes`` (start method
"spawn"), DDP over gloo on 127.0.0.1, each rank pinned to its own cores."""

from __future__ import annotations

import signal
import sys
import traceback
from typing import Any

from accelcore_strategies.failures import RankFailure, read_failure, signal_cause
from accelcore_strategies.launchers.local import LocalLauncher
from accelcore_strategies.processes import Descendants, terminate_tree
from accelcore_strategies.rank import WorkerSpec, run_rank


def _spawn_entry(index: int, spec: WorkerSpec) -> None:
    try:
        run_rank(spec, index)
    except BaseException:
        # torch's wrapper keeps the traceback for the parent only; print it like subprocess does
        traceback.print_exc()
        sys.stderr.flush()
        raise


class SpawnLauncher(LocalLauncher):
    name = "spawn"
    description = ("N local processes via torch.multiprocessing.spawn, DDP/gloo over loopback, "
                   "disjoint cores per rank")

    def _run(self, spec: WorkerSpec) -> None:
        import torch.multiprocessing as tmp
        from torch.multiprocessing.spawn import ProcessException

        below = Descendants()
        with self.runtime.exported():
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
