"""The training loop end to end on the synthetic set: records, max_iters, resume after SIGKILL,
config errors, and (slow) that a short run actually learns."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from accelcore.config import load_recipe
from accelcore.errors import PluginError, RecipeError
from accelcore.interfaces import TrainJob
from accelcore.training.checkpoint import load_checkpoint
from accelcore.training.loop import fit
from accelcore.training.lr_scheduler import LRScheduler


def tiny_recipe(cache: Path, **train) -> dict:
    cfg = {"batch_size": 4, "epochs": 3, "warmup_epochs": 1, "no_aug_epochs": 1,
           "eval_interval": 1, "threads": 1, "quiet": True, "seed": 3}
    cfg.update(train)
    return {
        "model": {"name": "yolox_nano", "num_classes": 3, "input_size": [128, 128]},
        "data": {"num_workers": 0,
                 "augment": {"multiscale_range": 1, "multiscale_interval": 2},
                 "synthetic": {"images": 16, "val_images": 4, "size": 128, "num_classes": 3,
                               "cache_dir": str(cache)}},
        "validate": {"batch_size": 4},
        "train": cfg,
    }


@pytest.fixture(scope="module")
def syn_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


def test_max_iters_keeps_schedule_and_writes_records(tmp_path: Path, syn_cache: Path):
    recipe = load_recipe(data=tiny_recipe(syn_cache, max_iters=3, epochs=5))
    summary = fit(TrainJob(recipe, tmp_path))
    assert summary["iterations"] == 3
    assert summary["final_ap50_95"] is not None
    for name in ("checkpoints/last.pth", "checkpoints/best.pth", "metrics.jsonl", "epochs.csv",
                 "train_summary.json"):
        assert (tmp_path / name).is_file(), name
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2, 3]
    # lr follows the schedule of the full 5-epoch run (4 it/epoch), not a 3-iteration one
    full = LRScheduler("quadwarm_cos_flat", 0.01 / 64 * 4, 4, 5, warmup_epochs=1, no_aug_epochs=1)
    assert [r["lr"] for r in rows] == pytest.approx([full.lr_at(i) for i in range(3)])
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in rows)
    epochs = list(csv.DictReader((tmp_path / "epochs.csv").open()))
    assert len(epochs) == 1 and epochs[0]["iterations"] == "3" and epochs[0]["ap50_95"] != ""
    saved = json.loads((tmp_path / "train_summary.json").read_text())
    assert saved["iterations"] == 3 and saved["last_checkpoint"].endswith("last.pth")
    # "model" holds deployable (EMA) weights loadable with weights_only
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pth")
    assert set(ckpt) >= {"model", "train", "meta"}
    assert ckpt["train"]["state"]["iteration"] == 3


def test_class_count_mismatch_is_one_line(tmp_path: Path, syn_cache: Path):
    data = tiny_recipe(syn_cache, max_iters=1)
    data["model"]["num_classes"] = 5
    with pytest.raises(RecipeError, match="model.num_classes: 5 but the train data has 3"):
        fit(TrainJob(load_recipe(data=data), tmp_path))


def test_unavailable_feature_fails_fast(tmp_path: Path, syn_cache: Path):
    import importlib.util

    if importlib.util.find_spec("intel_extension_for_pytorch") is not None:
        pytest.skip("IPEX is installed here; the ipex feature would run")
    recipe = load_recipe(data=tiny_recipe(syn_cache, max_iters=1, features=["ipex"]))
    with pytest.raises(PluginError, match=r"^train\.features\[0\]: feature 'ipex' is "
                                          r"unavailable here: .*train\.compile: true") as info:
        fit(TrainJob(recipe, tmp_path))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints" / "last.pth").exists()  # failed before training


def test_each_feature_reaches_its_own_plugin_in_order():
    from accelcore import hookimpl
    from accelcore.config import TrainConfig
    from accelcore.interfaces import Declaration
    from accelcore.plugins import PluginManager
    from accelcore.training.loop import prepare_training

    class Feature:
        def __init__(self, name: str) -> None:
            self.name = name

        @hookimpl
        def accelcore_declare(self):
            return [Declaration("feature", self.name, f"adds {self.name}")]

        @hookimpl
        def accelcore_prepare_training(self, model, optimizer, config):
            if self.name not in config.features:
                return None
            assert config.options.get(self.name) == {"level": self.name}
            return [*model, self.name], optimizer

    pm = PluginManager()
    for name in ("first", "second", "unused"):
        pm.register(Feature(name), name=name)
    cfg = TrainConfig(features=["second", "first"],
                      options={"first": {"level": "first"}, "second": {"level": "second"}})
    model, optimizer = prepare_training(pm, [], "opt", cfg)
    assert model == ["second", "first"] and optimizer == "opt"
    assert prepare_training(pm, [], "opt", TrainConfig()) == ([], "opt")


def test_unknown_feature_names_the_key_and_a_close_match(tmp_path: Path, syn_cache: Path):
    recipe = load_recipe(data=tiny_recipe(syn_cache, max_iters=1, features=["ipexx"]))
    with pytest.raises(PluginError, match=r"^train\.features\[0\]: unknown feature 'ipexx' "
                                          r"\(did you mean 'ipex'\?\)"):
        fit(TrainJob(recipe, tmp_path))


_CHILD = r"""
import json, sys
from pathlib import Path
from accelcore.config import load_recipe
from accelcore.interfaces import TrainJob
from accelcore.training.loop import fit
data = json.loads(sys.argv[1])
run_dir = Path(sys.argv[2])
resume = run_dir if sys.argv[3] == "resume" else None
fit(TrainJob(load_recipe(data=data), run_dir, resume=resume))
"""


def _run_child(data: dict, run_dir: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(data), str(run_dir), mode],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path, syn_cache: Path):
    data = tiny_recipe(syn_cache, checkpoint_interval=3, eval_interval=2, precision="16")
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"

    ref = _run_child(data, full_dir, "new")
    victim = _run_child(data, killed_dir, "new")
    last = killed_dir / "checkpoints" / "last.pth"
    deadline = time.time() + 600
    while not last.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert last.exists(), "the training never wrote a checkpoint before being killed"
    at = load_checkpoint(last)["train"]["state"]["iteration"]
    assert 0 < at < 12, f"killed run had already finished (iteration {at})"

    resumed = _run_child(data, killed_dir, "resume")
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read()
    assert ref.wait(timeout=900) == 0, ref.stderr.read()

    a = load_checkpoint(full_dir / "checkpoints" / "last.pth")["train"]
    b = load_checkpoint(killed_dir / "checkpoints" / "last.pth")["train"]
    assert a["state"]["iteration"] == b["state"]["iteration"] == 12
    for key, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    for key, tensor in a["ema"]["model"].items():
        torch.testing.assert_close(b["ema"]["model"][key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 12
    assert a["precision"] == b["precision"]  # grad scaler state continues
    # the records are cut back to the checkpoint and continued: no duplicates, same losses
    rows_a = [json.loads(x) for x in (full_dir / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows_b] == list(range(1, 13))
    assert [r["total_loss"] for r in rows_b] == pytest.approx(
        [r["total_loss"] for r in rows_a], rel=1e-4)
    assert len(list(csv.DictReader((killed_dir / "epochs.csv").open()))) == 3
