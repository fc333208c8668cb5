"""The kernels' build guard: a lock file left by a killed build never blocks a later build, and
live builders still wait for each other."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from accelcore.training import native

HOLD_LOCK = """
import sys, time
from pathlib import Path
from accelcore.training import native
with native.exclusive_build(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_lock_file_of_a_killed_build_is_removed(tmp_path):
    build_directory = tmp_path / "accelcore_kernel_0123456789"
    build_directory.mkdir()
    (build_directory / "lock").touch()  # what torch's FileBaton leaves when its holder is killed
    with native.exclusive_build(build_directory):
        assert not (build_directory / "lock").exists()


def test_a_live_build_is_waited_for(tmp_path):
    build_directory = tmp_path / "accelcore_kernel_0123456789"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(build_directory), "1.5"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with native.exclusive_build(build_directory):
            waited = time.monotonic() - start
    finally:
        holder.wait(timeout=30)
    assert waited > 1.0  # the holder kept the lock 1.5 s after saying so


def test_lock_dies_with_a_killed_holder(tmp_path):
    build_directory = tmp_path / "accelcore_kernel_0123456789"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(build_directory), "600"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    (build_directory / "lock").touch()  # the killed holder's torch build was under way
    holder.kill()
    holder.wait(timeout=30)
    with native.exclusive_build(build_directory):
        assert not (build_directory / "lock").exists()


def test_builds_go_under_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert native.extensions_root() == Path(tmp_path)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert native.extensions_root() == Path.home() / ".cache" / "torch_extensions" / "accelcore"
