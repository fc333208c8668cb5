"""One runtime setup for every process: what a child process actually runs under."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from accelcore import runtime
from accelcore.runtime import RuntimeSetup


def _report(path: str) -> None:
    """Child body: apply what the parent asked for, then say what is really in force (and how
    much of a fresh 256 MiB tensor the kernel backed with huge pages)."""
    import torch

    runtime.apply_inherited_setup()
    block = torch.ones(64 << 20)  # noqa: F841 - held while the kernel is asked
    huge_kib = 0
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("AnonHugePages:"):
                huge_kib = int(line.split()[1])
    Path(path).write_text(json.dumps({**runtime.describe_runtime(), "huge_kib": huge_kib}))


def _child_runtime(tmp_path: Path, setup: RuntimeSetup) -> dict:
    out = tmp_path / "child.json"
    proc = multiprocessing.get_context("spawn").Process(target=_report, args=(str(out),))
    with setup.exported():
        proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    return json.loads(out.read_text())


def test_env_of_the_default_setup_tunes_glibc_and_sizes_threads():
    env = RuntimeSetup(threads=3).env()
    assert env["MALLOC_MMAP_MAX_"] == "0" and int(env["MALLOC_TRIM_THRESHOLD_"]) >= 1 << 30
    assert env["OMP_NUM_THREADS"] == "3"
    assert json.loads(env[runtime.RUNTIME_ENV]) == {"allocator": "default", "malloc_tuning": True,
                                                    "threads": 3}


def test_stock_setup_sets_nothing_and_strips_inherited_tuning(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    monkeypatch.setenv("GLIBC_TUNABLES", runtime.HUGE_PAGES_TUNABLE)
    stock = RuntimeSetup.stock()
    assert not any(k.startswith(("MALLOC_", "GLIBC_")) for k in stock.env())
    with stock.exported():
        assert "MALLOC_MMAP_MAX_" not in os.environ and "GLIBC_TUNABLES" not in os.environ
    assert os.environ["MALLOC_MMAP_MAX_"] == "0"  # restored afterwards
    monkeypatch.setenv("GLIBC_TUNABLES", f"glibc.cpu.x86_shstk=off:{runtime.HUGE_PAGES_TUNABLE}")
    with stock.exported():  # the user's own tunables stay, only the huge pages go
        assert os.environ["GLIBC_TUNABLES"] == "glibc.cpu.x86_shstk=off"


def test_the_tuned_setup_asks_for_huge_pages_beside_the_users_own_tunables(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0:glibc.cpu.x86_shstk=off")
    assert RuntimeSetup().env()["GLIBC_TUNABLES"] == \
        "glibc.cpu.x86_shstk=off:glibc.malloc.hugetlb=1"
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert RuntimeSetup().env()["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert "GLIBC_TUNABLES" not in RuntimeSetup(malloc_tuning=False).env()


def test_a_single_run_restarts_once_for_huge_pages_only_where_they_are_granted_on_request(
        monkeypatch):
    calls = []
    monkeypatch.setattr(runtime.os, "execve", lambda *a: calls.append(a))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(runtime.RESTARTED_MARK, raising=False)
    mode = {"value": "madvise"}
    monkeypatch.setattr(runtime, "transparent_huge_pages", lambda: mode["value"])
    runtime.restart_for_huge_pages(RuntimeSetup(), ["run", "r.yaml"])
    path, command, env = calls.pop()
    assert command[1:] == ["-m", "accelcore.cli", "run", "r.yaml"]
    assert env["GLIBC_TUNABLES"] == runtime.HUGE_PAGES_TUNABLE
    assert env["MALLOC_MMAP_MAX_"] == "0" and env[runtime.RESTARTED_MARK] == "1"
    runtime.restart_for_huge_pages(RuntimeSetup(), None)  # Python callers keep their process
    runtime.restart_for_huge_pages(RuntimeSetup.stock(), ["run", "r.yaml"])
    runtime.restart_for_huge_pages(RuntimeSetup(allocator="jemalloc"), ["run", "r.yaml"])
    for value in ("always", "never", "unknown"):  # granted anyway, or not at all
        mode["value"] = value
        runtime.restart_for_huge_pages(RuntimeSetup(), ["run", "r.yaml"])
    mode["value"] = "madvise"
    with monkeypatch.context() as m:
        m.setenv(runtime.RESTARTED_MARK, "1")  # never twice
        runtime.restart_for_huge_pages(RuntimeSetup(), ["run", "r.yaml"])
    monkeypatch.setenv("GLIBC_TUNABLES", runtime.HUGE_PAGES_TUNABLE)  # started with it
    runtime.restart_for_huge_pages(RuntimeSetup(), ["run", "r.yaml"])
    assert calls == []


def test_exported_restores_the_environment(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with RuntimeSetup(threads=1).exported():
        assert os.environ["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in os.environ and runtime.RUNTIME_ENV not in os.environ


def test_from_recipe_reads_the_recipe_and_lets_inference_choose_threads():
    from accelcore.config import load_recipe

    recipe = load_recipe(data={"train": {"threads": 2, "malloc_tuning": False}})
    assert RuntimeSetup.from_recipe(recipe) == RuntimeSetup("default", False, 2)
    assert RuntimeSetup.from_recipe(recipe, threads=1).threads == 1


def test_a_tuned_child_reports_the_tuning_and_its_threads(tmp_path):
    info = _child_runtime(tmp_path, RuntimeSetup(threads=1))
    assert info["allocator"] == "glibc (tuned)"
    assert info["threads"] == 1
    assert info["env"]["MALLOC_MMAP_MAX_"] == "0"
    assert info["openmp"] != "unknown"
    granted = runtime.transparent_huge_pages() in ("always", "madvise")
    assert info["huge_pages"] == granted
    libc = os.confstr("CS_GNU_LIBC_VERSION") if hasattr(os, "confstr") else None
    if granted and libc and tuple(map(int, libc.split()[1].split(".")[:2])) >= (2, 35):
        assert info["huge_kib"] > 0  # the kernel really backed the heap with huge pages


def test_a_stock_child_runs_untuned_even_under_a_tuned_parent(tmp_path, monkeypatch):
    for key, value in runtime.GLIBC_TUNING_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GLIBC_TUNABLES", runtime.HUGE_PAGES_TUNABLE)
    info = _child_runtime(tmp_path, RuntimeSetup.stock())
    assert info["allocator"] == "glibc (stock)"
    assert "MALLOC_MMAP_MAX_" not in info["env"] and "GLIBC_TUNABLES" not in info["env"]
    assert not info["huge_pages"] or runtime.transparent_huge_pages() == "always"


@pytest.mark.slow
def test_accelerate_method_processes_run_under_the_recipe_setup(fresh_plugins, tmp_path):
    """Every row of an isolated accelerate stage records the setup its process really had."""
    from accelcore import create_model
    from accelcore.config import load_recipe
    from accelcore.data.coco import COCODataset
    from accelcore.data.synthetic import ensure_synthetic
    from accelcore.inference.accelerate import run_accelerate
    from accelcore.plugins import get_plugin_manager

    root = ensure_synthetic(tmp_path / "syn", images=2, val_images=2, size=96, seed=0,
                            num_classes=3)
    val = COCODataset(root, "val2017", "instances_val2017.json")
    recipe = load_recipe(data={
        "model": {"num_classes": 3, "input_size": [64, 64]},
        "accelerate": {"methods": ["original"], "batch_size": 2, "calibration_images": 2,
                       "threads": 1, "save": "none",
                       "latency": {"warmup": 0, "min_runs": 1, "min_seconds": 0.0}}})
    res = run_accelerate(recipe, create_model("yolox_nano", num_classes=3), tmp_path / "run",
                         val, val, get_plugin_manager())
    row = res["methods"][0]
    assert row["status"] == "ok", row
    assert row["runtime"]["allocator"] == "glibc (tuned)"
    assert row["runtime"]["threads"] == 1 and row["runtime"]["env"]["OMP_NUM_THREADS"] == "1"
    assert res["runtime_setup"] == {"allocator": "default", "malloc_tuning": True, "threads": 1}


def _worker_runtime(rank: int, world_size: int) -> dict:
    return runtime.describe_runtime()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["subprocess", "spawn"])
def test_strategy_workers_start_under_the_recipe_setup(strategy, fresh_plugins):
    """A worker reports what it runs under: the tuned glibc from its first allocation, and the
    threads its core pinning gave it."""
    from accelcore.config import load_recipe
    from accelcore.plugins import get_plugin_manager
    from accelcore.training.launch import launch

    recipe = load_recipe(data={"train": {"strategy": strategy, "num_processes": 2,
                                         "batch_size": 2}})
    info = launch(get_plugin_manager(), recipe, _worker_runtime, 2)
    assert info["allocator"] == "glibc (tuned)"
    assert info["env"]["MALLOC_MMAP_MAX_"] == "0"
    assert info["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)
    untuned = load_recipe(data={"train": {"strategy": strategy, "num_processes": 2,
                                          "batch_size": 2, "malloc_tuning": False}})
    assert launch(get_plugin_manager(), untuned, _worker_runtime, 2)["allocator"] == \
        "glibc (stock)"


_ARENAS_AFTER_A_THREAD = """
import ctypes, sys, threading
from accelcore import runtime
if sys.argv[1] == "tuned":
    assert runtime.tune_allocator()
def work():
    block = bytearray(80 << 20)  # a batch-sized buffer, allocated and freed off the main thread
    del block
thread = threading.Thread(target=work)
thread.start()
thread.join()
ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena N:" block per arena, on stderr
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
@pytest.mark.parametrize("mode, arenas", [("tuned", 1), ("stock", 2)])
def test_tuned_allocator_keeps_every_thread_in_the_one_tuned_arena(mode, arenas):
    """A thread of its own arena paid page faults on every batch (torch eager at half speed
    in the predict stream's inference thread); tuned, every thread shares the main arena."""
    env = {k: v for k, v in os.environ.items() if k not in runtime.GLIBC_TUNING_ENV}
    done = subprocess.run([sys.executable, "-c", _ARENAS_AFTER_A_THREAD, mode], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("Arena ") == arenas, done.stderr
