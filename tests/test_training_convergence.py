"""A short real training on the synthetic set must learn: loss falls and AP rises."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from accelcore.config import load_recipe
from accelcore.interfaces import TrainJob
from accelcore.training.loop import fit


@pytest.mark.slow
def test_short_run_loss_falls_and_ap_rises(tmp_path: Path):
    data = {
        "model": {"name": "yolox_nano", "num_classes": 3, "input_size": [160, 160]},
        "data": {"num_workers": 0, "augment": {"multiscale_range": 1},
                 "synthetic": {"images": 64, "val_images": 16, "size": 160, "num_classes": 3,
                               "cache_dir": str(tmp_path / "syn")}},
        "validate": {"batch_size": 16},
        "train": {"batch_size": 8, "epochs": 12, "warmup_epochs": 1, "no_aug_epochs": 2,
                  "eval_interval": 3, "basic_lr_per_img": 0.0008, "quiet": True, "seed": 0},
    }
    summary = fit(TrainJob(load_recipe(data=data), tmp_path / "run"))
    rows = list(csv.DictReader((tmp_path / "run" / "epochs.csv").open()))
    assert len(rows) == 12
    first, last = float(rows[0]["total_loss"]), float(rows[-1]["total_loss"])
    assert last < 0.9 * first, f"loss did not fall enough: {first:.3f} -> {last:.3f}"
    evals = [float(r["ap50"]) for r in rows if r["ap50"] != ""]
    assert len(evals) >= 4  # every 3 epochs, then every epoch in the no-aug tail
    assert evals[-1] > evals[0] and evals[-1] > 0, f"AP50 did not rise: {evals}"
    assert summary["best_ap50_95"] is not None and summary["best_ap50_95"] > 0


@pytest.mark.slow
def test_bf16_converges_like_fp32(tmp_path: Path):
    """bf16 autocast + channels_last (what `train.precision: auto` picks on bf16 hardware)
    learns at least about as well as fp32. 96 steps on 64 images are chaotic: over 8 seeds on
    one machine the mean loss of the last three epochs ranged 7.8-9.3 in fp32 and 7.4-10.4 in
    bf16, and any change of summation order reshuffles which seeds land where (CI saw bf16 7.7
    vs fp32 9.2 one day, 9.9 vs 8.3 the next, with correct kernels both times). The comparison
    therefore uses each run's mean loss over all 12 epochs — the whole curve, which seeds move
    far less than its end — averaged over three seeds, one-sided: bf16's at most 15% above
    fp32's. A bf16 that does not learn fails the first check (its last epochs must be 10% below
    its first). AP50 at most 0.10 below fp32's (COCOeval 0-1 scale; 16 validation images make a
    few hundredths run-to-run noise even in fp32)."""
    results = {}
    for precision in ("32", "bf16"):
        first, last, curve, ap = [], [], [], []
        for seed in (0, 1, 2):
            data = {
                "model": {"name": "yolox_nano", "num_classes": 3, "input_size": [160, 160]},
                "data": {"num_workers": 0, "augment": {"multiscale_range": 1},
                         "synthetic": {"images": 64, "val_images": 16, "size": 160,
                                       "num_classes": 3, "cache_dir": str(tmp_path / "syn")}},
                "validate": {"batch_size": 16},
                "train": {"batch_size": 8, "epochs": 12, "warmup_epochs": 1,
                          "no_aug_epochs": 2, "eval_interval": 3, "basic_lr_per_img": 0.0008,
                          "quiet": True, "seed": seed, "precision": precision,
                          "channels_last": True},
            }
            run = tmp_path / f"run{precision}_{seed}"
            summary = fit(TrainJob(load_recipe(data=data), run))
            rows = csv.DictReader((run / "epochs.csv").open())
            losses = [float(row["total_loss"]) for row in rows]
            first.append(losses[0])
            last.append(sum(losses[-3:]) / 3)
            curve.append(sum(losses) / len(losses))
            ap.append(summary["final_ap50"])
        results[precision] = tuple(sum(v) / len(v) for v in (first, last, curve, ap))
    (_, _, fp32_curve, fp32_ap), (bf16_first, bf16_last, bf16_curve, bf16_ap) = \
        results["32"], results["bf16"]
    assert bf16_last < 0.9 * bf16_first, results
    assert bf16_curve < 1.15 * fp32_curve, results
    assert bf16_ap > 0 and bf16_ap >= fp32_ap - 0.10, results
