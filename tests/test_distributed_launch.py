"""Launchers, core partitioning and allocator option of the multi-process strategies."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.distributed as dist
from accelcore_strategies import failures
from accelcore_strategies.cores import Cpu, plan_cores
from accelcore_strategies.failures import RankFailure, root_cause
from accelcore_strategies.launchers import (
    LAUNCHERS,
    RayLauncher,
    SingleLauncher,
    SpawnLauncher,
    SubprocessLauncher,
)

from accelcore import runtime
from accelcore.config import load_recipe
from accelcore.errors import BackendUnavailable, PluginError, RecipeError


def report_placement(rank: int, world_size: int) -> list[dict] | None:
    """Every rank's pinning as seen from inside it, gathered on rank 0."""
    mine = {"rank": rank, "world": dist.get_world_size(), "cpus": sorted(os.sched_getaffinity(0)),
            "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
            "allocator": runtime.loaded_allocator()}
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return gathered if rank == 0 else None


def test_strategies_declared(fresh_plugins):
    from accelcore.plugins import get_plugin_manager

    pm = get_plugin_manager()
    for name in ("single", "subprocess", "spawn", "ray"):
        assert pm.find("strategy", name) is not None, name
    ray_ok = importlib.util.find_spec("ray") is not None
    assert pm.find("strategy", "ray").declaration.available is ray_ok
    # Each strategy plugin answers for its own names only.
    for impl in pm.hook.accelcore_launch.get_hookimpls():
        assert impl.function(strategy="no-such-strategy", fn=ok_anywhere, nprocs=1,
                             recipe=load_recipe(data={})) is None
    # One registry: every declared built-in strategy is a Launcher class of its own name.
    assert set(LAUNCHERS) == {"single", "subprocess", "spawn", "ray"}
    assert all(cls.name == name for name, cls in LAUNCHERS.items())


def ok_anywhere(rank: int, world_size: int) -> tuple[int, int]:
    return rank, world_size


def returns_none(rank: int, world_size: int) -> None:
    return None


def test_core_launch_runs_through_the_hook_and_names_the_key(fresh_plugins):
    from accelcore.plugins import get_plugin_manager
    from accelcore.training.launch import launch

    pm = get_plugin_manager()
    recipe = load_recipe(data={})
    assert launch(pm, recipe, ok_anywhere, 1) == (0, 1)  # "single", the default strategy
    # A function whose rank 0 returns None still counts as run (not "no plugin ran it").
    assert launch(pm, recipe, returns_none, 1) is None
    with pytest.raises(PluginError, match=r"^--strategies: no plugin ran strategy 'nobody'; "
                                          r"declared: .*subprocess"):
        launch(pm, recipe, ok_anywhere, 1, strategy="nobody", key="--strategies")


def test_single_runs_one_process_only():
    with pytest.raises(RecipeError, match="train.num_processes: strategy 'single' runs one"):
        SingleLauncher(2).launch(ok_anywhere)


def test_strategy_options_are_checked_by_the_plugin(fresh_plugins):
    from accelcore.plugins import get_plugin_manager

    pm = get_plugin_manager()

    def launch_with(strategy: str, options: dict) -> object:
        recipe = load_recipe(data={"train": {"strategy": strategy, "num_processes": 2,
                                             "batch_size": 4, "options": {strategy: options}}})
        return pm.hook.accelcore_launch(strategy=strategy, fn=ok_anywhere, nprocs=2,
                                        recipe=recipe)

    # Rejected before anything starts (ray is not even imported for these).
    with pytest.raises(RecipeError) as info:
        launch_with("ray", {"adress": "auto"})
    assert str(info.value) == ("<dict>: train.options.ray.adress: unknown option of strategy "
                               "'ray' (did you mean 'address'?); known: address, "
                               "cpus_per_worker, storage_path, timeout_s")
    with pytest.raises(RecipeError, match=r"^<dict>: train.options.ray.cpus_per_worker: "
                                          r"expected an integer >= 1, got 0$"):
        launch_with("ray", {"cpus_per_worker": 0})
    with pytest.raises(RecipeError, match=r"train.options.spawn.port: expected a port number"):
        launch_with("spawn", {"port": 70000})
    with pytest.raises(RecipeError, match=r"train.options.single.port: unknown option .* "
                                          r"known: none"):
        launch_with("single", {"port": 1})


def test_strategy_options_reach_the_launcher(monkeypatch):
    recipe = load_recipe(data={"train": {"strategy": "ray", "num_processes": 2, "batch_size": 4,
                                         "options": {"ray": {"address": "auto",
                                                             "cpus_per_worker": 3}}}})
    ray = RayLauncher.from_recipe(2, recipe)
    assert (ray.address, ray.cpus_per_worker, ray.global_batch) == ("auto", 3, 4)
    monkeypatch.setenv("MASTER_PORT", "29411")
    local = SubprocessLauncher.from_recipe(2, load_recipe(data={"train": {"batch_size": 4}}))
    assert local.port == 29411  # torch's variable, when the recipe names no port
    pinned = load_recipe(data={"train": {"options": {"subprocess": {"port": 29500,
                                                                    "timeout_s": 60}}}})
    local = SubprocessLauncher.from_recipe(2, pinned)
    assert (local.port, local.timeout_s) == (29500, 60.0)
    monkeypatch.setenv("MASTER_PORT", "http")
    with pytest.raises(RecipeError, match="MASTER_PORT: expected a port number 1-65535, "
                                          "got 'http'"):
        SpawnLauncher(2)


def test_old_ray_section_names_its_new_place():
    with pytest.raises(RecipeError) as info:
        load_recipe(data={"ray": {"address": "auto", "cpus_per_worker": 1}})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("<dict>: 'ray' is no longer a recipe key; use train.options: {ray:")


def test_plan_cores_disjoint_numa_and_no_smt_siblings():
    # 2 NUMA nodes x 4 cores x 2 hyperthreads; sibling of cpu c is c + 8.
    topo = [Cpu(c + 8 * t, c, c // 4) for t in range(2) for c in range(8)]
    plan = plan_cores(2, topo)
    assert plan == [[0, 1, 2, 3], [4, 5, 6, 7]]  # one per physical core, one node each
    assert plan_cores(4, topo) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan_cores(2, topo, cores_per_proc=1) == [[0], [1]]
    # Oversubscribed: shared round robin, still one core each.
    assert plan_cores(3, [Cpu(0, 0, 0), Cpu(1, 1, 0)]) == [[0], [1], [0]]
    with pytest.raises(ValueError):
        plan_cores(0, topo)


def test_plan_cores_on_this_machine():
    allowed = os.sched_getaffinity(0)
    plan = plan_cores(min(2, len(allowed)))
    flat = [c for cpus in plan for c in cpus]
    assert len(flat) == len(set(flat)) and set(flat) <= allowed


def test_root_cause_prefers_real_error_over_lost_peer():
    lost = RankFailure(0, "RuntimeError: Connection closed by peer [127.0.0.1]:1", True, 1.0)
    real = RankFailure(1, "ValueError: boom", False, 2.0)
    assert root_cause([lost, real]) is real
    assert failures.is_peer_loss("RuntimeError: [pair.cc:537] Read error: Connection reset by "
                                 "peer")
    assert not failures.is_peer_loss("ValueError: boom")
    assert failures.signal_cause(-9) == "killed by signal SIGKILL"


def test_missing_allocator_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime, "library_dirs", lambda: [str(tmp_path)])
    with pytest.raises(BackendUnavailable, match="libjemalloc2"):
        runtime.allocator_env("jemalloc")
    with pytest.raises(BackendUnavailable, match="train.allocator"):
        SubprocessLauncher(2, allocator="tcmalloc")
    assert runtime.allocator_env("default") == {}


@pytest.mark.parametrize("launcher_cls", [SubprocessLauncher, SpawnLauncher])
def test_launcher_pins_each_rank_to_its_own_cores(launcher_cls, capfd):
    placements = launcher_cls(2).launch(report_placement)
    assert [p["rank"] for p in placements] == [0, 1]
    assert all(p["world"] == 2 for p in placements)
    expected = plan_cores(2)
    for p in placements:
        assert p["cpus"] == sorted(expected[p["rank"]])
        assert p["threads"] == len(p["cpus"]) and p["omp"] == str(len(p["cpus"]))
    assert not set(placements[0]["cpus"]) & set(placements[1]["cpus"])
    out = capfd.readouterr().out
    assert f"rank 0: cores {expected[0]} threads {len(expected[0])}" in out


@pytest.mark.skipif(runtime.find_allocator("jemalloc") is None,
                    reason="libjemalloc not installed (apt-get install libjemalloc2)")
def test_jemalloc_is_preloaded_into_workers():
    placements = SubprocessLauncher(2, allocator="jemalloc").launch(report_placement)
    assert [p["allocator"] for p in placements] == ["jemalloc", "jemalloc"]
    assert runtime.loaded_allocator() == "default"  # the launcher itself is untouched


@pytest.mark.skipif(runtime.find_allocator("jemalloc") is None,
                    reason="libjemalloc not installed (apt-get install libjemalloc2)")
def test_single_process_restarts_itself_under_the_allocator():
    import subprocess
    import sys

    probe = ("import os; from accelcore import runtime; "
             "print(runtime.loaded_allocator(), os.environ.get(runtime.RESTARTED_MARK))")
    restart = ("import sys; from accelcore import runtime; "
               f"runtime.restart_with_allocator('jemalloc', [sys.executable, '-c', {probe!r}])")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", runtime.RESTARTED_MARK)}
    out = subprocess.run([sys.executable, "-c", restart], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["jemalloc", "1"]


def test_allocator_restart_never_loops_and_python_callers_get_a_clear_error(monkeypatch):
    runtime.require_allocator("default", None)  # nothing to do
    monkeypatch.setattr(runtime, "loaded_allocator", lambda: "default")
    monkeypatch.setattr(runtime, "find_allocator", lambda name: f"/usr/lib/lib{name}.so.2")
    with pytest.raises(BackendUnavailable, match="LD_PRELOAD=/usr/lib/libjemalloc.so.2"):
        runtime.require_allocator("jemalloc", None)
    calls = []
    monkeypatch.setattr(runtime.os, "execve", lambda *a: calls.append(a))
    runtime.require_allocator("jemalloc", ["run", "r.yaml"])
    path, command, env = calls[0]
    assert command[1:] == ["-m", "accelcore.cli", "run", "r.yaml"]
    assert env["LD_PRELOAD"].startswith("/usr/lib/libjemalloc.so.2")
    assert env[runtime.RESTARTED_MARK] == "1"
    monkeypatch.setenv(runtime.RESTARTED_MARK, "1")
    with pytest.raises(BackendUnavailable, match="not mapped"):
        runtime.require_allocator("jemalloc", ["run", "r.yaml"])
