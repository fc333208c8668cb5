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


SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "yolox_nano_synthetic.pth"


def _finetune(tmp_path: Path, precision: str, seed: int) -> dict:
    """Fine-tune the shipped 8-class checkpoint to a 3-class synthetic set (class predictions
    re-initialised); the run's per-epoch losses and AP evaluations."""
    data = {
        "model": {"name": "yolox_nano", "num_classes": 3, "input_size": [160, 160],
                  "checkpoint": str(SHIPPED), "finetune": True},
        "data": {"num_workers": 0, "augment": {"multiscale_range": 1},
                 "synthetic": {"images": 64, "val_images": 32, "size": 160, "num_classes": 3,
                               "cache_dir": str(tmp_path / "syn")}},
        "validate": {"batch_size": 16},
        "train": {"batch_size": 8, "epochs": 8, "warmup_epochs": 1, "no_aug_epochs": 2,
                  "eval_interval": 3, "basic_lr_per_img": 0.0008, "quiet": True, "seed": seed,
                  "precision": precision, "channels_last": True},
    }
    run = tmp_path / f"run{precision}_{seed}"
    summary = fit(TrainJob(load_recipe(data=data), run))
    rows = list(csv.DictReader((run / "epochs.csv").open()))
    losses = [float(row["total_loss"]) for row in rows]
    return {"losses": losses, "curve": sum(losses) / len(losses),
            "ap_evals": [float(row["ap50_95"]) for row in rows if row["ap50_95"] != ""],
            "ap50_95": summary["final_ap50_95"], "ap50": summary["final_ap50"]}


@pytest.mark.slow
def test_bf16_converges_like_fp32(tmp_path: Path):
    """bf16 autocast + channels_last (what `train.precision: auto` picks on bf16 hardware) learns
    like fp32: both fine-tune the shipped checkpoint to a new class set from the same seeds.

    Why a fine-tune and not a run from scratch: 96 steps from random weights on 64 images are
    chaotic — some runs break through to a loss of ~7 around step 30, others plateau near 9.5,
    and which ones do changes with any change of summation order (fp32 seeds 0 and 1: 6.8 vs
    10.0; CI failed twice on correct kernels). From trained features the runs are stable: on a
    Zen 3 the bf16 and fp32 loss curves of a seed agreed to 0.1% and AP50:95 to 0.004
    (0.450 / 0.446) while AP50:95 rose from ~0.26 to ~0.45.

    Stated tolerances: per seed, bf16's mean loss over the run within 5% of fp32's; averaged over
    two seeds, final AP50:95 and AP50 (COCOeval 0-1 scale, 32 validation images) within 0.05 of
    fp32's. Each bf16 run must learn on its own: its last epochs' loss at most 85% of its first,
    and AP50:95 higher at the end than at its first evaluation."""
    runs = {(p, seed): _finetune(tmp_path, p, seed) for seed in (0, 1) for p in ("32", "bf16")}
    for seed in (0, 1):
        fp32, bf16 = runs["32", seed], runs["bf16", seed]
        assert sum(bf16["losses"][-3:]) / 3 <= 0.85 * bf16["losses"][0], bf16
        assert bf16["ap_evals"][-1] > bf16["ap_evals"][0], bf16
        assert abs(bf16["curve"] / fp32["curve"] - 1) <= 0.05, (seed, fp32, bf16)
    for metric in ("ap50_95", "ap50"):
        fp32_mean = sum(runs["32", seed][metric] for seed in (0, 1)) / 2
        bf16_mean = sum(runs["bf16", seed][metric] for seed in (0, 1)) / 2
        assert abs(bf16_mean - fp32_mean) <= 0.05, (metric, runs)
