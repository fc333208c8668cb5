"""Latency procedure, calibration images, selection rule, artifact manifest checks."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from accelcore.inference.calibration import build_calibration, spread_indices
from accelcore.inference.latency import measure_latency
from accelcore.inference.select import select_method
from accelcore.machine import machine_info


def test_min_runs_and_min_seconds_are_both_honoured():
    calls = []
    x = torch.zeros(4, 3, 8, 8)
    stats = measure_latency(lambda t: calls.append(time.sleep(0.01)), x, warmup=3, min_runs=5,
                            min_seconds=0.25)
    assert stats["runs"] >= 20  # 0.25 s of 10 ms calls, far more than min_runs
    assert len(calls) == stats["runs"] + 3  # warm-up calls are not timed
    assert 9 <= stats["median_ms"] <= 40
    assert stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert stats["img_per_s"] == pytest.approx(4 * 1000 / stats["median_ms"])

    stats = measure_latency(lambda t: time.sleep(0.03), x, warmup=0, min_runs=7, min_seconds=0)
    assert stats["runs"] == 7  # the count governs when the time is already reached


class _Images:
    """Minimal dataset: item 0 is the BGR image (distinct constant per index)."""

    def __init__(self, n: int):
        self.data = [np.full((60, 80, 3), i, dtype=np.uint8) for i in range(n)]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i], np.zeros((0, 5), np.float32), (60, 80), i


def test_calibration_yields_real_letterboxed_images():
    calib = build_calibration(_Images(50), (32, 32), num_images=20, batch_size=8)
    batches = list(calib())
    assert [b.shape[0] for b in batches] == [8, 8, 4]
    every = torch.cat(batches)
    assert every.dtype == torch.float32 and every.shape[1:] == (3, 32, 32)
    # Letterboxed: ratio 0.4 -> 24 rows of image, then grey (114) padding below.
    assert (every[:, :, 24:, :] == 114).all()
    picked = sorted({int(v) for v in every[:, 0, 0, 0]})
    assert picked == spread_indices(50, 20) and picked[0] == 0 and picked[-1] == 49
    assert torch.equal(torch.cat(list(calib())), every)  # re-iterable, same images


def test_selection_fastest_within_criterion():
    rows = [
        {"method": "original", "status": "ok", "latency_ms": 100, "ap50_95": 0.400, "ap50": 0.6},
        {"method": "fast_bad", "status": "ok", "latency_ms": 20, "ap50_95": 0.380, "ap50": 0.6},
        {"method": "mid_ok", "status": "ok", "latency_ms": 40, "ap50_95": 0.395, "ap50": 0.6},
        {"method": "broken", "status": "failed", "latency_ms": None},
    ]
    crit = SimpleNamespace(metric="ap50_95", kind="absolute", max_drop=1.0)
    assert select_method(rows, crit)[0] == "mid_ok"  # fast_bad drops 2 AP points
    crit = SimpleNamespace(metric="ap50_95", kind="relative", max_drop=0.06)
    assert select_method(rows, crit)[0] == "fast_bad"  # 5 % relative drop is allowed
    crit = SimpleNamespace(metric="ap50", kind="absolute", max_drop=0.0)
    assert select_method(rows, crit)[0] == "fast_bad"
    rows[0]["status"] = "failed"
    assert select_method(rows, crit)[0] is None


def test_machine_info_has_flags():
    info = machine_info()
    assert info["logical_cores"] >= 1 and "avx512f" in info["flags"] and "amx_tile" in info["flags"]


def test_load_artifact_rejects_non_artifact(tmp_path):
    from accelcore.errors import AccelcoreError
    from accelcore.inference.artifact import load_artifact

    with pytest.raises(AccelcoreError, match="not an accelcore artifact"):
        load_artifact(tmp_path)
