"""Atomic checkpoints: RNG round trip, weights_only loading, a kill during save never corrupts."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from accelcore.errors import CheckpointError
from accelcore.training.checkpoint import (
    atomic_save,
    clean_stale_temps,
    load_checkpoint,
    rng_state,
    set_rng_state,
)


def test_rng_state_roundtrip_through_weights_only_file(tmp_path: Path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leave a cached gaussian in numpy's state
    atomic_save({"rng": rng_state()}, tmp_path / "c.pth")
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(load_checkpoint(tmp_path / "c.pth")["rng"])
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2])


def test_load_errors_are_one_line(tmp_path: Path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad)


_WRITER = r"""
import sys, torch
from accelcore.training.checkpoint import atomic_save
path = sys.argv[1]
i = 0
print("ready", flush=True)
while True:
    i += 1
    # ~16 MB so the write takes long enough to be interrupted mid-way
    atomic_save({"i": i, "w": torch.full((4_000_000,), float(i))}, path)
"""


def test_kill_during_save_never_leaves_corrupt_file(tmp_path: Path):
    target = tmp_path / "last.pth"
    atomic_save({"i": 0, "w": torch.zeros(4_000_000)}, target)
    rng = random.Random(0)
    seen = set()
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.1, 0.7))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = load_checkpoint(target)  # must always be a complete file
        assert ckpt["w"].shape == (4_000_000,)
        assert bool((ckpt["w"] == float(ckpt["i"])).all())
        seen.add(ckpt["i"])
    assert len(seen) > 1, "the writer never completed a save; test did not exercise anything"
    leftovers = list(tmp_path.glob(".*.tmp"))
    clean_stale_temps(tmp_path)
    assert not list(tmp_path.glob(".*.tmp"))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"], leftovers
