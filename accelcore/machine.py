"""What this CPU can do: its model name, ISA flags, and which precisions run natively here.

Everything that chooses by hardware (``train.precision: auto``, ``accelerate.methods: auto``,
``accelcore doctor``, backends that refuse an emulated path) asks this module, so one faked flag
set (``ACCELCORE_CPU_FLAGS``, used by tests) changes every decision consistently.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Any, Literal

#: A space-separated flag list that replaces /proc/cpuinfo's (tests; "what would it pick on …").
FLAGS_ENV = "ACCELCORE_CPU_FLAGS"
#: The flags that shape CPU inference and training speed, shown in reports and `doctor`.
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
                  "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
                  "avx_ne_convert")

Support = Literal["native", "emulated", "absent"]


def _cpuinfo_field(prefix: str) -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=1)
def _real_flags() -> frozenset[str]:
    return frozenset(_cpuinfo_field("flags").split())


def real_cpu_flags() -> frozenset[str]:
    """The flags of the CPU itself, never faked (for code compiled for this machine)."""
    return _real_flags()


def cpu_flags() -> set[str]:
    """The CPU feature flags (``ACCELCORE_CPU_FLAGS`` if set, else /proc/cpuinfo; may be empty)."""
    faked = os.environ.get(FLAGS_ENV)
    if faked is not None:
        return set(faked.replace(",", " ").split())
    return set(_real_flags())


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def precision_support(flags: set[str] | None = None) -> dict[str, Support]:
    """How each compute precision runs on this CPU.

    ``native``: the CPU has instructions for it (bf16: AVX512-BF16 or AMX; fp16: AVX512-FP16
    or AMX-FP16; int8: any AVX2 CPU multiplies u8×s8 in hardware, VNNI/AMX only make it faster —
    see :func:`int8_engine`). ``emulated``: it runs, converted through fp32, usually slower than
    fp32 (bf16 on a Zen 3 ran 0.3× fp32). ``absent``: the backends refuse it (no AVX2).
    """
    flags = cpu_flags() if flags is None else flags
    has_simd = "avx2" in flags or "avx512f" in flags
    out: dict[str, Support] = {"fp32": "native" if has_simd else "emulated"}
    bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    out["bf16"] = "native" if bf16 else ("emulated" if has_simd else "absent")
    fp16 = bool(flags & {"avx512_fp16", "amx_fp16"})
    out["fp16"] = "native" if fp16 else ("emulated" if has_simd else "absent")
    out["int8"] = "native" if has_simd else "absent"
    return out


def int8_engine(flags: set[str] | None = None) -> str:
    """The fastest int8 dot-product unit here: "AMX", "VNNI", "AVX2 (no VNNI)" or "none"."""
    flags = cpu_flags() if flags is None else flags
    if "amx_int8" in flags:
        return "AMX"
    if flags & {"avx512_vnni", "avx_vnni"}:
        return "VNNI"
    return "AVX2 (no VNNI)" if "avx2" in flags else "none"


def bf16_engine(flags: set[str] | None = None) -> str:
    """The bf16 unit here: "AMX", "AVX512-BF16", or "none (emulated through fp32)"."""
    flags = cpu_flags() if flags is None else flags
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return "none (emulated through fp32)"


def has_native(precision: str, flags: set[str] | None = None) -> bool:
    return precision_support(flags).get(precision) == "native"


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, the reported ISA flags and precision support of this machine."""
    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "flags": {name: name in flags for name in REPORTED_FLAGS},
        "precision_support": precision_support(flags),
        "platform": platform.platform(),
    }
    if os.environ.get(FLAGS_ENV) is not None:
        info["flags_faked"] = True
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    return info
