"""One latency procedure for every method (the machine it ran on: :mod:`accelcore.machine`).

``measure_latency`` is the only place speed is measured: warm-up calls are discarded, then the
callable runs until *both* ``min_runs`` calls and ``min_seconds`` of wall time are reached, and
the median (with p10/p90) of the per-call times is reported. A minimum time as well as a count
keeps fast methods from being judged on a handful of calls while the shared cores are busy.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


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


#: Packages the core itself runs on; backends add theirs through ``Declaration.packages``.
CORE_PACKAGES = ("accelcore", "torch", "numpy")


def versions(pm: Any = None) -> dict:
    """Installed versions of the packages that shape the numbers (absent ones are skipped):
    the core's own and every package a loaded plugin declared (``Declaration.packages``)."""
    from importlib.metadata import PackageNotFoundError, version

    names = list(CORE_PACKAGES)
    if pm is not None:
        for provided in pm.declarations():
            names.extend(provided.declaration.packages)
    out = {"python": platform.python_version()}
    for name in dict.fromkeys(names):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
