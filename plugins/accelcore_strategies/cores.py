"""Core pinning: split this node's cores into disjoint sets, one per local rank
(bigdl-nano-init style), and pin a rank with its threads to its set."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cpu:
    cpu: int  # logical CPU id (what sched_setaffinity takes)
    core: int  # physical core id
    node: int  # NUMA node


def cpu_topology() -> list[Cpu]:
    """Logical CPUs this process may use, with core and NUMA node (torch's run_cpu parser)."""
    allowed = os.sched_getaffinity(0)
    try:
        info = _run_cpu_info()
        rows = [Cpu(int(c), int(core), int(node or 0)) for c, core, _socket, node in info.cpuinfo]
    except Exception as exc:  # no lscpu (minimal containers): every allowed CPU its own core
        log.debug("lscpu topology unavailable (%s); treating each CPU as a core", exc)
        rows = [Cpu(c, c, 0) for c in sorted(allowed)]
    return [r for r in rows if r.cpu in allowed]


def _run_cpu_info() -> Any:
    # run_cpu calls logging.basicConfig(level=INFO) at import time; undo that side effect so
    # importing it does not change how the CLI's log output looks.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from torch.backends.xeon.run_cpu import _CPUinfo
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return _CPUinfo()


def plan_cores(nprocs: int, topology: list[Cpu] | None = None,
               cores_per_proc: int | None = None) -> list[list[int]]:
    """Disjoint CPU lists, one per local process: one logical CPU per physical core (no SMT
    siblings, as run_cpu does by default), contiguous runs in (NUMA node, core) order so a
    process stays inside one node whenever the split allows it."""
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    topology = cpu_topology() if topology is None else topology
    first_cpu: dict[tuple[int, int], int] = {}
    for row in sorted(topology, key=lambda r: (r.node, r.core, r.cpu)):
        first_cpu.setdefault((row.node, row.core), row.cpu)
    cpus = list(first_cpu.values())
    if not cpus:
        raise RuntimeError("no CPU available to this process (sched_getaffinity is empty)")
    if len(cpus) < nprocs:
        # Oversubscribed: share round-robin rather than fail; throughput will suffer.
        log.warning("%d processes on %d physical cores: cores are shared", nprocs, len(cpus))
        return [[cpus[i % len(cpus)]] for i in range(nprocs)]
    per = len(cpus) // nprocs
    if cores_per_proc is not None:
        per = max(1, min(per, cores_per_proc))
    return [cpus[i * per:(i + 1) * per] for i in range(nprocs)]


def bind_to_cores(cpus: list[int]) -> int:
    """Pin every thread of this process to ``cpus`` and size torch's pools; returns threads.

    All threads (not only the caller) are pinned, because an OpenMP pool created before this
    call would otherwise keep running on every core.
    """
    mask = set(cpus)
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, mask)
        except OSError:  # a thread that exited meanwhile
            pass
    threads = len(cpus)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
