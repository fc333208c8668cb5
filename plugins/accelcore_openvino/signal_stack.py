"""A guard against OpenVINO's dangling alternate signal stack (glibc ``sigaltstack``).

OpenVINO's CPU plugin installs an ~11 KiB alternate signal stack on the thread that compiles a
model and, when compiled models are released out of creation order, puts back a stack it has
already freed. CPython registers its handlers with SA_ONSTACK, so the next signal on that thread
(SIGCHLD from a DataLoader worker) runs on unmapped memory and the process dies with SIGSEGV.
"""

from __future__ import annotations

import ctypes
import logging
import threading

from accelcore.runtime import _libc_function

log = logging.getLogger(__name__)

SS_ONSTACK = 1
SS_DISABLE = 2


class SignalStack(ctypes.Structure):
    # glibc stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int),
                ("ss_size", ctypes.c_size_t)]


#: Alternate signal stacks we installed, one per thread id; kept alive for the process's life.
_SIGNAL_STACKS: dict[int, ctypes.Array] = {}


def ensure_signal_stack(size: int = 256 << 10) -> bool:
    """Make the calling thread's alternate signal stack one we own (``size`` bytes).

    Call this after creating or releasing OpenVINO objects. Returns True if the stack in place
    is ours.
    """
    sigaltstack = _libc_function("sigaltstack")
    if sigaltstack is None:
        return False
    current = SignalStack()
    if sigaltstack(None, ctypes.byref(current)) != 0:
        return False
    if current.ss_flags & SS_ONSTACK:  # running on it right now: cannot change it
        return False
    buffer = _SIGNAL_STACKS.get(threading.get_ident())
    if buffer is None or len(buffer) < size:
        buffer = ctypes.create_string_buffer(int(size))
    address = ctypes.addressof(buffer)
    if current.ss_sp == address and current.ss_size == len(buffer):
        return True
    fresh = SignalStack(address, 0, len(buffer))
    if sigaltstack(ctypes.byref(fresh), None) != 0:
        log.debug("sigaltstack failed: errno %d", ctypes.get_errno())
        return False
    _SIGNAL_STACKS[threading.get_ident()] = buffer
    return True
