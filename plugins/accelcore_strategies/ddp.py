"""What every rank of every multi-process strategy does around the core loop.

Shared by ``subprocess``, ``spawn`` and ``ray``: split this node's cores into disjoint sets (one
per local rank, bigdl-nano-init style), pin the process and size torch's thread pool to its set,
join the gloo process group, run the rank's function (normally ``accelcore.training.loop.fit``),
record a failure as one line for the launcher, and leave the group again.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import pickle
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from accelcore.runtime import loaded_allocator

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Generous like torch's own default: rank 0 evaluates alone while the others wait in a barrier,
# so a short gloo timeout would kill healthy runs. Dead ranks are caught by launcher polling.
DEFAULT_TIMEOUT_S = 1800.0
SPEC_FILE = "spec.pkl"
RESULT_FILE = "result.pkl"

# Substrings of errors that a rank raises because *another* rank went away: they are effects,
# never the root cause, when a real failure is also known.
_PEER_LOSS_HINTS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                    "socket closed", "read error", "connection refused", "end of file")


# ---------------------------------------------------------------- rendezvous


@dataclass(frozen=True)
class Rendezvous:
    """Where rank 0's TCPStore listens; every rank connects there to form the gloo group."""

    addr: str
    port: int
    world_size: int
    timeout_s: float = DEFAULT_TIMEOUT_S


def find_free_port(host: str = LOOPBACK) -> int:
    """A port the kernel considers free right now on ``host`` (bind to port 0 and release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def is_port_in_use_error(message: str) -> bool:
    """True for rank 0's TCPStore failing to listen (another process took the port)."""
    text = message.lower()
    return "eaddrinuse" in text or "address already in use" in text


def init_process_group(rank: int, rendezvous: Rendezvous | None) -> bool:
    """Join the gloo group; returns False if a launcher (Ray Train) already did it."""
    if dist.is_initialized():
        if rendezvous is not None and (dist.get_rank() != rank
                                       or dist.get_world_size() != rendezvous.world_size):
            raise RuntimeError(
                f"process group already initialised as rank {dist.get_rank()}/"
                f"{dist.get_world_size()}, expected {rank}/{rendezvous.world_size}")
        return False
    if rendezvous is None:
        raise RuntimeError("no rendezvous given and no process group initialised")
    if rendezvous.addr in (LOOPBACK, "localhost"):
        # gloo picks its interface from the hostname; on one node keep all traffic on loopback.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://{rendezvous.addr}:{rendezvous.port}", rank=rank,
        world_size=rendezvous.world_size, timeout=timedelta(seconds=rendezvous.timeout_s))
    return True


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- cores


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


# ---------------------------------------------------------------- failures


@dataclass
class RankFailure:
    """Why one rank stopped, in one line."""

    rank: int
    cause: str
    peer_loss: bool = False  # raised because another rank went away (an effect, not the cause)
    time: float = field(default_factory=time.time)


def describe_exception(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:297] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def is_peer_loss(exc_or_text: BaseException | str) -> bool:
    text = exc_or_text if isinstance(exc_or_text, str) else describe_exception(exc_or_text)
    return any(hint in text.lower() for hint in _PEER_LOSS_HINTS)


def write_failure(comm_dir: str | Path, rank: int, exc: BaseException) -> None:
    cause = describe_exception(exc)
    record = {"rank": rank, "cause": cause, "peer_loss": is_peer_loss(cause), "time": time.time()}
    path = Path(comm_dir) / f"rank{rank}.error.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)  # the launcher never reads a half-written file


def read_failure(comm_dir: str | Path, rank: int) -> RankFailure | None:
    path = Path(comm_dir) / f"rank{rank}.error.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return RankFailure(rank, record["cause"], bool(record["peer_loss"]), float(record["time"]))


def root_cause(failures: list[RankFailure]) -> RankFailure:
    """The failure that explains the others: a real error before a lost-peer error, then the
    earliest."""
    return min(failures, key=lambda f: (f.peer_loss, f.time, f.rank))


def signal_cause(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


# ---------------------------------------------------------------- one rank


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


def fit_job(job: Any, rank: int, world_size: int) -> dict:
    """The function every rank of a real training run executes: the core loop, unchanged."""
    from accelcore.training.loop import fit

    return fit(job, rank=rank, world_size=world_size)
