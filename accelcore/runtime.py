"""Process-level CPU runtime tuning: thread pools and the glibc allocator.

``tune_allocator`` changes glibc malloc at runtime through ``mallopt`` (no LD_PRELOAD, no
restart): large activation tensors are otherwise served by fresh ``mmap`` calls and returned to
the kernel on free, so every training step pays page faults to zero-fill the same gigabytes
again. Keeping freed memory in the heap avoids that — in one heap: every thread but the main one
otherwise gets an arena of its own, whose heaps (64 MB at most) cannot hold a batch's
activations and are trimmed on free, so a model run from any other thread (the predict
stream's inference thread) paid the page faults again: torch eager at half speed.

The heap is also backed by transparent huge pages where the kernel grants them on request
(``madvise`` mode): a training step walks ~6 GB of activations, whose address translations miss
the caches with 4 KiB pages. glibc only asks for huge pages when its tunable is set at start-up,
so a single run restarts itself once for it (:func:`restart_for_huge_pages`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import glob
import json
import logging
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from accelcore.errors import BackendUnavailable

log = logging.getLogger(__name__)

# glibc <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_ALLOCATOR_TUNED = False


def configure_threads(n: int | None, interop: int | None = None) -> int:
    """Set torch's intra-op threads to ``n`` (None: leave torch's default); returns the count."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be >= 1, got {n}")
        torch.set_num_threads(int(n))
    if interop is not None:
        try:
            torch.set_num_interop_threads(int(interop))
        except RuntimeError:  # only allowed before the first inter-op parallel work
            log.debug("interop threads already fixed; keeping %d",
                      torch.get_num_interop_threads())
    return torch.get_num_threads()


#: How much lower the scheduling priority of the streaming predictor's decode threads is than
#: the compute's: see :func:`lower_priority`.
INPUT_NICE = 10
#: The same for training loader workers: as low as a nice value goes. Measured on a 2-core
#: Sapphire Rapids (bf16 step ~1.3 s, augmentation ~110 ms of CPU a batch of 64; medians of
#: 24 steps, same-process e2e / compute): nice 10 0.80-0.99 (5 runs), nice 19 1.00-1.04 (3),
#: SCHED_IDLE 0.85-1.05 (5). At 10 the workers still took slices mid-step, each stalling both
#: of the step's threads; at 19 they run almost only while the step waits for its batch, on
#: both cores.
LOADER_NICE = 19


def lower_priority(nice: int = INPUT_NICE) -> None:
    """Raise the calling thread's nice value by ``nice``; threads it starts inherit it.

    Input work (JPEG decoding, augmentation) runs at a lower priority than the compute. As
    equals on the same cores, a decode that preempts one of the runtime's threads mid-layer
    stalls the whole parallel region at its next barrier: the model ran ~30% below its own rate
    while streaming. Lower, the input work takes the cores when the compute waits — which is
    when the next batch is needed — so no work is lost, only the stalls. Measured on a 2-core
    Zen 4: streaming 416 px int8 over coco128 ~145 -> ~165 img/s; training e2e/compute 89-91%
    -> 99-107%. Linux only (a per-thread attribute there); elsewhere, or where it is refused,
    nothing changes.
    """
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        current = os.getpriority(os.PRIO_PROCESS, 0)  # 0: the calling thread, on Linux
        os.setpriority(os.PRIO_PROCESS, 0, min(19, current + nice))


def _libc_function(name: str) -> ctypes._CFuncPtr | None:
    """``name`` from the C library, or None where there is no such library or function."""
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return getattr(libc, name)
    except (OSError, AttributeError):  # musl / macOS may lack it
        return None


def tune_allocator(top_pad: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Stop glibc from mmap-ing / trimming big blocks, in one arena for every thread; True if
    applied (glibc only). Threads that already have an arena keep it: call this early."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = (mallopt(M_MMAP_MAX, 0) == 1
          and mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1
          and mallopt(M_TOP_PAD, int(top_pad)) == 1
          and mallopt(M_ARENA_MAX, 1) == 1)
    _ALLOCATOR_TUNED = ok
    if not ok:
        log.warning("mallopt rejected the allocator settings; allocator left as is")
    return ok


# ---------------------------------------------------------------- allocator replacements
# jemalloc / tcmalloc only take effect through LD_PRELOAD, i.e. in a process started with it.

ALLOCATORS = {"jemalloc": ("jemalloc",), "tcmalloc": ("tcmalloc", "tcmalloc_minimal")}
ALLOCATOR_PACKAGES = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}
# run_cpu's jemalloc tuning (torch.backends.xeon.run_cpu.set_memory_allocator).
JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto"


def library_dirs() -> list[str]:
    """run_cpu's search path plus the Debian multiarch folders, where the Debian packages put
    ``libjemalloc.so.2`` / ``libtcmalloc_minimal.so.4`` (run_cpu only finds ``lib*.so`` in
    ``/usr/lib``, i.e. it misses them)."""
    dirs = [os.environ.get("CONDA_PREFIX", ""), os.environ.get("VIRTUAL_ENV", "")]
    dirs = [f"{d}/lib" for d in dirs if d]
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs += [os.path.expanduser("~/.local/lib"), "/usr/local/lib", "/usr/local/lib64"]
    if multiarch:
        dirs += [f"/usr/lib/{multiarch}", f"/lib/{multiarch}"]
    return dirs + ["/usr/lib", "/usr/lib64"]


def find_allocator(name: str) -> str | None:
    for stem in ALLOCATORS[name]:
        for folder in library_dirs():
            matches = sorted(glob.glob(os.path.join(folder, f"lib{stem}.so*")))
            # Prefer the plain/soname file over versioned or debug variants.
            matches = [m for m in matches if "debug" not in os.path.basename(m)]
            if matches:
                return min(matches, key=len)
    return None


def allocator_env(name: str) -> dict[str, str]:
    """Environment that makes a *new* process use allocator ``name`` (``{}`` for default)."""
    if name == "default":
        return {}
    if name not in ALLOCATORS:
        raise BackendUnavailable(f"train.allocator: unknown allocator '{name}'; "
                                 f"allowed: default, {', '.join(ALLOCATORS)}")
    path = find_allocator(name)
    if path is None:
        raise BackendUnavailable(
            f"train.allocator: {name} requested but no lib{ALLOCATORS[name][0]}.so* found in "
            f"{', '.join(library_dirs())}; install the Debian package "
            f"{ALLOCATOR_PACKAGES[name]} (apt-get install {ALLOCATOR_PACKAGES[name]}) or use "
            "train.allocator: default")
    preload = [path] + [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    env = {"LD_PRELOAD": ":".join(preload)}
    if name == "jemalloc":
        env["MALLOC_CONF"] = os.environ.get("MALLOC_CONF", JEMALLOC_CONF)
    return env


def loaded_allocator() -> str:
    """Which malloc replacement is mapped into this process (checks LD_PRELOAD took effect)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in maps:
            return name
    return "default"


#: Set in the environment of a process we restarted under an allocator (stops restart loops).
RESTARTED_MARK = "ACCELCORE_ALLOCATOR_RESTARTED"


def restart_with_allocator(name: str, command: list[str]) -> None:
    """Replace this process by ``command`` with allocator ``name`` preloaded.

    Returns (doing nothing) if ``name`` is "default" or already loaded. A process that was
    already restarted and still lacks the allocator raises instead of looping.
    """
    if name == "default" or loaded_allocator() == name:
        return
    if os.environ.get(RESTARTED_MARK):
        raise BackendUnavailable(
            f"train.allocator: {name} was preloaded (LD_PRELOAD={os.environ.get('LD_PRELOAD')}) "
            "but is not mapped into the process")
    _restart(command, {**allocator_env(name), RESTARTED_MARK: "1"}, f"under {name}")


def _restart(command: list[str], env: Mapping[str, str], why: str) -> None:
    """Replace this process by ``command``, its environment updated with ``env``."""
    log.info("restarting %s: %s", why, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, {**os.environ, **env})


def restart_for_huge_pages(setup: RuntimeSetup, command_line: list[str] | None) -> None:
    """Restart this command once under glibc's start-up tuning, huge pages included, where
    ``setup`` wants the tuned glibc heap and the kernel grants huge pages only on request but
    this process was started without asking. Only from the command line (``command_line`` = the
    CLI arguments); a Python caller keeps its process (mallopt still tunes the rest)."""
    if (command_line is None or setup.allocator != "default" or not setup.malloc_tuning
            or os.environ.get(RESTARTED_MARK) or _asked_for_huge_pages()
            or transparent_huge_pages() != "madvise"):
        return
    _restart([sys.executable, "-m", "accelcore.cli", *command_line],
             {**_glibc_start_env(), RESTARTED_MARK: "1"}, "with the heap on huge pages")


def require_process_setup(setup: RuntimeSetup, command_line: list[str] | None) -> None:
    """Before a single-process job: restart the command under ``setup``'s allocator, or for the
    huge pages of its tuned glibc heap, where this process lacks them (see the two above)."""
    require_allocator(setup.allocator, command_line)
    restart_for_huge_pages(setup, command_line)


def require_allocator(name: str, command_line: list[str] | None) -> None:
    """Make sure allocator ``name`` is in use for a single-process job.

    From the command line (``command_line`` = the CLI arguments) the process restarts itself
    as ``python -m accelcore.cli …`` with the allocator preloaded; called from Python
    (``command_line`` None) it cannot, and says how instead of silently ignoring the key.
    """
    if name == "default" or loaded_allocator() == name:
        return
    if command_line is None:
        env = allocator_env(name)  # names a missing library first
        raise BackendUnavailable(
            f"train.allocator: {name} needs a process started with it; run from the accelcore "
            f"command line (it restarts itself) or set LD_PRELOAD={env['LD_PRELOAD']}")
    restart_with_allocator(name, [sys.executable, "-m", "accelcore.cli", *command_line])


# ---------------------------------------------------------------- one runtime setup
# Training, the strategies' workers, the accelerate stage's per-method processes, predict and
# bench all run under the same allocator and thread settings: a speed-up measured between two
# processes that were set up differently measures the setup, not the method (eager fp32 at
# batch 64 ran 3× slower in an untuned child process than in the tuned parent).

#: Set in a child's environment: the RuntimeSetup (JSON) the child applies first thing.
RUNTIME_ENV = "ACCELCORE_RUNTIME"
#: glibc reads these at start-up: the same effect as tune_allocator()'s mallopt calls, but in
#: force from the process's first allocation (a child imports torch before it could call mallopt).
GLIBC_TUNING_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
                    "MALLOC_TOP_PAD_": str(256 << 20), "MALLOC_ARENA_MAX": "1"}
#: glibc (2.35+) then madvises its heap for transparent huge pages; older ones ignore it.
#: Measured on a 2-core Zen 3 (yolox_nano, batch 64, 416 px, fp32 + channels_last): the lean
#: step's backward 3-6% faster in each of three alternated pairs; torch's own ops unchanged.
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_REPORTED_ENV = ("LD_PRELOAD", "MALLOC_CONF", "OMP_NUM_THREADS", "KMP_BLOCKTIME",
                 "KMP_AFFINITY", "GLIBC_TUNABLES", *GLIBC_TUNING_ENV)


def transparent_huge_pages() -> str:
    """The kernel's THP mode: "always", "madvise" (only where a process asks), "never", or
    "unknown" (not Linux, or not readable)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    chosen = re.search(r"\[(\w+)\]", text)
    return chosen.group(1) if chosen else "unknown"


def glibc_tunables(current: str | None, huge_pages: bool) -> str:
    """``GLIBC_TUNABLES`` as ``current`` has it (the user's own tunables kept), with the heap's
    huge pages asked for or not."""
    name = HUGE_PAGES_TUNABLE.split("=")[0]
    kept = [t for t in (current or "").split(":") if t and t.split("=")[0] != name]
    return ":".join([*kept, HUGE_PAGES_TUNABLE] if huge_pages else kept)


def _glibc_start_env() -> dict[str, str]:
    """The environment that tunes glibc from a new process's first allocation."""
    return {**GLIBC_TUNING_ENV,
            "GLIBC_TUNABLES": glibc_tunables(os.environ.get("GLIBC_TUNABLES"), True)}


def _asked_for_huge_pages() -> bool:
    return HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")


def heap_on_huge_pages() -> bool:
    """Whether glibc's heap in this process gets transparent huge pages."""
    mode = transparent_huge_pages()
    return loaded_allocator() == "default" and (
        mode == "always" or (mode == "madvise" and _asked_for_huge_pages()))


@dataclass(frozen=True)
class RuntimeSetup:
    """The process-level settings a job runs under.

    ``allocator``: "default" (glibc), "jemalloc" or "tcmalloc" (preloaded into new processes).
    ``malloc_tuning``: keep freed memory in glibc's heap (no mmap/trim storms; default allocator).
    ``threads``: torch intra-op threads (None: torch's default, one per usable core).
    ``stock()`` is what a user has before installing accelcore: nothing tuned.
    """

    allocator: str = "default"
    malloc_tuning: bool = True
    threads: int | None = None

    @classmethod
    def stock(cls) -> RuntimeSetup:
        return cls(allocator="default", malloc_tuning=False, threads=None)

    @classmethod
    def from_recipe(cls, recipe: Any, threads: int | None = None) -> RuntimeSetup:
        """The recipe's setup; ``threads`` overrides the training thread count (inference)."""
        cfg = recipe.train
        return cls(allocator=cfg.allocator, malloc_tuning=cfg.malloc_tuning,
                   threads=threads if threads is not None else cfg.threads)

    def env(self) -> dict[str, str]:
        """Environment that makes a *new* process start under this setup (and apply it)."""
        env = allocator_env(self.allocator)
        if self.malloc_tuning and self.allocator == "default":
            env.update(_glibc_start_env())
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        env[RUNTIME_ENV] = json.dumps(dataclasses.asdict(self))
        return env

    def apply(self) -> None:
        """Apply what can still change inside this (already running) process."""
        if self.malloc_tuning and self.allocator == "default":
            tune_allocator()
        configure_threads(self.threads)

    def exported(self) -> contextlib.AbstractContextManager[None]:
        """Export :meth:`env` for the block, for start methods that inherit the environment
        (multiprocessing spawn, Ray's local workers). A stock setup also removes the tuning
        variables this process may carry, so its children really run untuned."""
        values, drop = self.env(), []
        if not self.malloc_tuning:
            drop = [*GLIBC_TUNING_ENV, "LD_PRELOAD", "MALLOC_CONF"]
            rest = glibc_tunables(os.environ.get("GLIBC_TUNABLES"), False)
            if rest:
                values["GLIBC_TUNABLES"] = rest
            else:
                drop.append("GLIBC_TUNABLES")
        return environment(values, drop)


@contextlib.contextmanager
def environment(values: Mapping[str, str], drop: Iterable[str] = ()) -> Iterator[None]:
    """``os.environ`` with ``values`` set and the ``drop`` variables removed for the block,
    then restored as it was."""
    drop = [key for key in drop if key not in values]
    saved = {key: os.environ.get(key) for key in [*values, *drop]}
    for key in drop:
        os.environ.pop(key, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def inherited_setup() -> RuntimeSetup | None:
    """The setup a parent asked this process to run under (``None`` if started by hand)."""
    text = os.environ.get(RUNTIME_ENV)
    if not text:
        return None
    try:
        return RuntimeSetup(**json.loads(text))
    except (ValueError, TypeError):
        log.warning("ignoring malformed %s=%r", RUNTIME_ENV, text)
        return None


def apply_inherited_setup() -> RuntimeSetup | None:
    """First thing in a child process: apply the setup the parent chose, if any."""
    setup = inherited_setup()
    if setup is not None:
        setup.apply()
    return setup


def openmp_runtime() -> str:
    """The OpenMP library mapped into this process (libgomp, Intel's libiomp5, LLVM's libomp)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    found = [name for name in ("libiomp5", "libgomp", "libomp") if f"/{name}" in maps]
    return ", ".join(found) or "none loaded"


def glibc_tuned() -> bool:
    """True if this process's glibc heap keeps big blocks (mallopt here or the env at start)."""
    return _ALLOCATOR_TUNED or all(os.environ.get(k) == v for k, v in GLIBC_TUNING_ENV.items())


def describe_runtime() -> dict[str, Any]:
    """What this process actually runs under (written into every report row and summary)."""
    allocator = loaded_allocator()
    if allocator == "default":
        allocator = "glibc (tuned)" if glibc_tuned() else "glibc (stock)"
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = []
    return {"allocator": allocator, "huge_pages": heap_on_huge_pages(),
            "openmp": openmp_runtime(), "threads": torch.get_num_threads(), "affinity": affinity,
            "env": {k: os.environ[k] for k in _REPORTED_ENV if k in os.environ}}


def runtime_label(info: dict[str, Any]) -> str:
    """``"glibc (tuned) + huge pages, libgomp, 2 threads"`` — the short form for tables."""
    heap = f"{info['allocator']}{' + huge pages' if info.get('huge_pages') else ''}"
    return f"{heap}, {info['openmp']}, {info['threads']} threads"
