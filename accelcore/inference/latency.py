"""One latency procedure for every method, and a description of the machine it ran on.

``measure_latency`` is the only place speed is measured: warm-up calls are discarded, then the
callable runs until *both* ``min_runs`` calls and ``min_seconds`` of wall time are reached, and
the median (with p10/p90) of the per-call times is reported. A minimum time as well as a count
keeps fast methods from being judged on a handful of calls while the shared cores are busy.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

# CPU features that decide which precisions can be fast (reported with every benchmark).
_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
          "amx_bf16", "amx_int8")


def measure_latency(fn: Callable[[Any], Any], inputs: Any, warmup: int = 2, min_runs: int = 5,
                    min_seconds: float = 10.0, max_runs: int | None = None) -> dict:
    """Time ``fn(inputs)``; return ``median_ms, p10_ms, p90_ms, mean_ms, runs, img_per_s``.

    ``inputs`` is passed unchanged on every call (a batch tensor); ``img_per_s`` uses its first
    dimension as the batch size (1 if it has none). ``max_runs`` caps very fast callables.
    """
    if min_runs < 1:
        raise ValueError(f"min_runs must be >= 1, got {min_runs}")
    for _ in range(max(0, warmup)):
        fn(inputs)
    times: list[float] = []
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn(inputs)
        times.append(time.perf_counter() - t0)
        enough = len(times) >= min_runs and time.perf_counter() - started >= min_seconds
        if enough or (max_runs is not None and len(times) >= max_runs):
            break
    ms = sorted(t * 1000.0 for t in times)
    median = statistics.median(ms)
    batch = int(inputs.shape[0]) if hasattr(inputs, "shape") and len(inputs.shape) else 1
    return {
        "median_ms": median,
        "p10_ms": _percentile(ms, 10),
        "p90_ms": _percentile(ms, 90),
        "mean_ms": statistics.fmean(ms),
        "runs": len(ms),
        "img_per_s": batch * 1000.0 / median if median > 0 else float("inf"),
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted list (numpy's default method)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty set where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info() -> dict:
    """CPU model, core counts, torch threads and the relevant ISA flags of this machine."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = cpu_flags()
    info: dict[str, Any] = {
        "cpu": model,
        "logical_cores": os.cpu_count(),
        "flags": {name: name in flags for name in _FLAGS},
        "platform": platform.platform(),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
    except ImportError:  # psutil is a dependency, but keep this helper usable without it
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def versions(names: tuple[str, ...] = ("accelcore", "torch", "torchao", "openvino", "nncf",
                                       "onnx", "onnxruntime", "neural-compressor-pt",
                                       "intel-extension-for-pytorch", "numpy")) -> dict:
    """Installed versions of the packages that shape the numbers (absent ones are skipped)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
