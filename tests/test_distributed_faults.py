"""A failing rank ends the whole job quickly, with one line naming it; nothing is left behind."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from accelcore_strategies.failures import DistributedError
from accelcore_strategies.launchers import SpawnLauncher, SubprocessLauncher, local

BOUND_S = 60.0  # generous for a shared 2-core machine; a hang would take the gloo timeout


def failing_rank(mode: str, pid_file: str, rank: int, world_size: int) -> str:
    """Rank 0 starts a grandchild (must not survive); rank 1 fails mid-training."""
    if rank == 0:
        child = subprocess.Popen(["sleep", "600"])
        Path(pid_file).write_text(str(child.pid))
    t = torch.ones(4)
    for step in range(200):
        dist.all_reduce(t)
        if rank == 1 and step == 30:  # ~1.5 s in: the launcher has seen the grandchild
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("boom at step 30")
        time.sleep(0.05)
    return "finished"


def ok_rank(rank: int, world_size: int) -> int:
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return int(t.item())


def workers_left(before: set[int]) -> list[psutil.Process]:
    """Children started since ``before`` that still run. multiprocessing's resource tracker is
    not counted: it is a per-parent helper that lives as long as this (the launching) process."""
    left = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.pid in before or _gone(proc.pid):
                continue
            if "multiprocessing.resource_tracker" in " ".join(proc.cmdline()):
                continue
        except psutil.NoSuchProcess:
            continue
        left.append(proc)
    return left


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("launcher_cls", [SubprocessLauncher, SpawnLauncher])
@pytest.mark.parametrize("mode,cause", [("raise", "ValueError: boom at step 30"),
                                        ("kill", "killed by signal SIGKILL")])
def test_dead_rank_ends_job_with_one_line(launcher_cls, mode, cause, tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    pid_file = tmp_path / "grandchild.pid"
    started = time.monotonic()
    with pytest.raises(DistributedError) as info:
        launcher_cls(2, grace_s=2.0).launch(
            functools.partial(failing_rank, mode, str(pid_file)))
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert "\n" not in message
    assert f"rank 1 failed: {cause}" in message, message
    assert elapsed < BOUND_S
    assert workers_left(before) == []
    assert _gone(int(pid_file.read_text()))  # the rank's own child was stopped too


def _occupy_port() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def test_busy_preferred_port_is_replaced():
    with _occupy_port() as sock:
        busy = sock.getsockname()[1]
        run = SubprocessLauncher(2, port=busy)
        assert run.launch(ok_rank) == 3
        assert run.last_port != busy


def test_port_taken_after_choice_is_retried(monkeypatch):
    """The race: the port was free when chosen, then taken before rank 0 listened."""
    with _occupy_port() as sock:
        busy = sock.getsockname()[1]
        real = local.find_free_port
        calls = []

        def stale_then_real(host: str = "127.0.0.1") -> int:
            calls.append(host)
            return busy if len(calls) == 1 else real(host)

        monkeypatch.setattr(local, "find_free_port", stale_then_real)
        run = SubprocessLauncher(2, grace_s=2.0)
        assert run.launch(ok_rank) == 3
        assert len(calls) == 2 and run.last_port != busy
