"""Every multi-process strategy trains yolox_nano for a few iterations with 2 processes."""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from accelcore_strategies.processes import terminate_tree
from accelcore_strategies.rendezvous import find_free_port
from test_distributed_faults import workers_left

from accelcore.config import load_recipe
from accelcore.pipeline import run_recipe

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed")


def tiny_recipe(strategy: str, **options: object) -> object:
    return load_recipe(data={
        "name": f"tiny-{strategy}", "stages": ["train"],
        "model": {"name": "yolox_nano", "input_size": [128, 128], "num_classes": 8},
        "data": {"num_workers": 0, "synthetic": {"images": 8, "val_images": 4, "size": 128}},
        "train": {"strategy": strategy, "num_processes": 2, "batch_size": 4, "max_iters": 2,
                  "epochs": 1, "warmup_epochs": 0, "no_aug_epochs": 0, "quiet": True,
                  "options": {strategy: dict(options)}},
    })


def check_run(results: dict, run_dir: Path) -> None:
    summary = results["train"]
    assert summary["world_size"] == 2 and summary["iterations"] == 2
    assert summary["batch_size"] == 4 and summary["img_per_s"] > 0
    assert Path(summary["last_checkpoint"]).is_file()
    written = json.loads((run_dir / "train_summary.json").read_text())  # rank 0 wrote it
    assert written["world_size"] == 2


@pytest.mark.parametrize("strategy", ["subprocess", "spawn"])
def test_local_strategy_trains_yolox_nano(strategy, tmp_path, capfd):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    results = run_recipe(tiny_recipe(strategy), out=tmp_path / "run")
    check_run(results, tmp_path / "run")
    out = capfd.readouterr().out
    assert "rank 0: cores [" in out and "rank 1: cores [" in out
    # rank 0 alone printed the final line; rank 1 logged nothing of its own
    assert out.count("accelcore: trained 2 iterations") == 1
    assert workers_left(before) == []


@pytest.mark.slow
@needs_ray
def test_ray_strategy_trains_yolox_nano(tmp_path):
    results = run_recipe(tiny_recipe("ray", cpus_per_worker=1), out=tmp_path / "run")
    check_run(results, tmp_path / "run")


@pytest.mark.slow
@needs_ray
@pytest.mark.parametrize("mode,cause", [("raise", "ValueError: boom at step 30"),
                                        ("kill", "worker process died")])
def test_ray_fault_names_rank_and_cause(mode, cause, tmp_path):
    import ray.cloudpickle
    import test_distributed_faults
    from accelcore_strategies.failures import DistributedError
    from accelcore_strategies.launchers import RayLauncher
    from test_distributed_faults import failing_rank

    # Ray workers cannot import test modules: ship the failing function by value.
    ray.cloudpickle.register_pickle_by_value(test_distributed_faults)
    with pytest.raises(DistributedError, match=f"rank 1 failed: {cause}") as info:
        RayLauncher(2, cpus_per_worker=1).launch(
            functools.partial(failing_rank, mode, str(tmp_path / "pid")))
    assert "\n" not in str(info.value)


@pytest.fixture
def ray_head(tmp_path):
    """A Ray 'cluster' of one head node on this machine, as a second machine would join it.

    Stopped by terminating the tree of this `ray start --block` process, not with `ray stop`,
    which would also stop every other Ray instance of this user on the (shared) machine.
    """
    port = find_free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--num-cpus", "2", "--port", str(port),
         "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
         "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(ray_bin), "status", "--address", address],
                             capture_output=True).returncode != 0:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray head did not come up on {address}")
            time.sleep(2)
        yield address
    finally:
        terminate_tree([head.pid], grace_s=15)
        head.wait(timeout=30)


@pytest.mark.slow
@needs_ray
def test_ray_cluster_via_address(ray_head, tmp_path):
    """The multi-node path: train.options.ray.address points at a running cluster (here on
    loopback)."""
    results = run_recipe(tiny_recipe("ray", address=ray_head, cpus_per_worker=1),
                         out=tmp_path / "run")
    check_run(results, tmp_path / "run")
