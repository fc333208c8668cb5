"""Process teardown: stop workers together with everything they started."""

from __future__ import annotations

import contextlib
import time

import psutil


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
    stop_processes(list(procs.values()), grace_s)


def stop_processes(procs: list[psutil.Process], grace_s: float) -> None:
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


class Descendants:
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
        stop_processes(list(self.seen.values()), grace_s)
