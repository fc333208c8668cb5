"""Process-level CPU runtime tuning: thread pools and the glibc allocator.

``tune_allocator`` changes glibc malloc at runtime through ``mallopt`` (no LD_PRELOAD, no
restart): large activation tensors are otherwise served by fresh ``mmap`` calls and returned to
the kernel on free, so every training step pays page faults to zero-fill the same gigabytes
again. Keeping freed memory in the heap avoids that.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

# glibc <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

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


def tune_allocator(top_pad: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Stop glibc from mmap-ing / trimming big blocks; True if applied (glibc only)."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.name != "posix":
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl / macOS: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = (mallopt(M_MMAP_MAX, 0) == 1
          and mallopt(M_TRIM_THRESHOLD, int(trim_threshold)) == 1
          and mallopt(M_TOP_PAD, int(top_pad)) == 1)
    _ALLOCATOR_TUNED = ok
    if not ok:
        log.warning("mallopt rejected the allocator settings; allocator left as is")
    return ok


class _SignalStack(ctypes.Structure):
    # glibc stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int),
                ("ss_size", ctypes.c_size_t)]


#: Alternate signal stacks we installed, one per thread id; kept alive for the process's life.
_SIGNAL_STACKS: dict[int, ctypes.Array] = {}


def ensure_signal_stack(size: int = 256 << 10) -> bool:
    """Make the calling thread's alternate signal stack one we own (``size`` bytes).

    OpenVINO's CPU plugin installs an ~11 KiB alternate signal stack on the thread that compiles
    a model and, when compiled models are released out of creation order, puts back a stack it
    has already freed. CPython registers its handlers with SA_ONSTACK, so the next signal on
    that thread (SIGCHLD from a DataLoader worker) runs on unmapped memory and the process dies
    with SIGSEGV. Call this after creating or releasing OpenVINO objects. Returns True if the
    stack in place is ours.
    """
    if os.name != "posix":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        sigaltstack = libc.sigaltstack
    except (OSError, AttributeError):
        return False
    current = _SignalStack()
    if sigaltstack(None, ctypes.byref(current)) != 0:
        return False
    ss_onstack = 1
    if current.ss_flags & ss_onstack:  # running on it right now: cannot change it
        return False
    buffer = _SIGNAL_STACKS.get(threading.get_ident())
    if buffer is None or len(buffer) < size:
        buffer = ctypes.create_string_buffer(int(size))
    address = ctypes.addressof(buffer)
    if current.ss_sp == address and current.ss_size == len(buffer):
        return True
    fresh = _SignalStack(address, 0, len(buffer))
    if sigaltstack(ctypes.byref(fresh), None) != 0:
        log.debug("sigaltstack failed: errno %d", ctypes.get_errno())
        return False
    _SIGNAL_STACKS[threading.get_ident()] = buffer
    return True
