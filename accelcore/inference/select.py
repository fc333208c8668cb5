"""Pick the method to deploy: the fastest one whose accuracy stays within the criterion."""

from __future__ import annotations

import math
from typing import Any


def accuracy_drop(row: dict, baseline: dict, metric: str, kind: str) -> float | None:
    """Drop of ``metric`` vs ``baseline``: AP points (0-100) if absolute, fraction if relative.

    Metrics are stored on COCOeval's 0-1 scale. ``None`` when either value is missing.
    """
    value, base = row.get(metric), baseline.get(metric)
    if value is None or base is None or any(math.isnan(float(v)) for v in (value, base)):
        return None
    if kind == "relative":
        return (base - value) / base if base > 0 else (0.0 if value >= base else math.inf)
    return (base - value) * 100.0


def select_method(methods: list[dict], criterion: Any, baseline: str = "original"
                  ) -> tuple[str | None, str]:
    """``(method or None, reason)``: fastest ``ok`` method meeting ``criterion``.

    ``criterion`` has ``metric`` ("ap50_95"/"ap50"), ``kind`` ("absolute"/"relative") and
    ``max_drop``. The baseline always meets it; a method without metrics never does.
    """
    rows = {m["method"]: m for m in methods}
    base = rows.get(baseline)
    if base is None or base.get("status") != "ok":
        return None, f"baseline '{baseline}' did not run, so no accuracy criterion can be checked"
    candidates = []
    for row in methods:
        if row.get("status") != "ok" or row.get("latency_ms") is None:
            continue
        drop = 0.0 if row["method"] == baseline else accuracy_drop(
            row, base, criterion.metric, criterion.kind)
        row["accuracy_drop"] = drop
        if drop is not None and drop <= criterion.max_drop:
            candidates.append(row)
    if not candidates:
        return None, "no method met the accuracy criterion"
    best = min(candidates, key=lambda r: r["latency_ms"])
    unit = "AP points" if criterion.kind == "absolute" else "of the baseline"
    drop = best["accuracy_drop"]
    shown = f"{drop:.2f} {unit}" if criterion.kind == "absolute" else f"{drop:.1%} {unit}"
    return best["method"], (f"fastest of {len(candidates)} method(s) within "
                            f"{criterion.metric} drop <= {criterion.max_drop} "
                            f"({criterion.kind}); its drop: {shown}")
