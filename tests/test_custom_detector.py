"""A third-party detector, installed by entry point only, runs through the whole core unchanged.

``accelcore_tinygrid`` below is a complete model plugin written the way a third party would: a
few convs predicting one box per 16-pixel grid cell, its own loss (with its own loss keys), its
own decode and NMS — plain torch, nothing borrowed from YOLOX. It is put on ``sys.path`` with a
dist-info declaring the ``accelcore`` entry point (what ``pip install`` leaves behind), then
trained, validated, accelerated, reported and used for prediction with the ordinary commands.
"""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pytest
import torch
from test_plugins import install_on_path, run_cli

from accelcore.errors import PluginError
from accelcore.interfaces import Detector, missing_detector_members
from accelcore.plugins import get_plugin_manager

TINY_GRID_PLUGIN = '''
"""accelcore_tinygrid: a tiny single-scale grid detector, as a third-party model plugin."""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import accelcore
from accelcore.interfaces import Declaration

STRIDE = 16


def box_iou(a, b):
    """IoU of every x1y1x2y2 box of ``a`` [N, 4] with every box of ``b`` [M, 4]."""
    tl = torch.maximum(a[:, None, :2], b[None, :, :2])
    br = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (br - tl).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


class TinyGrid(nn.Module):
    """Raw output [B, cells, 5 + C]: (sigmoid x, sigmoid y, log w, log h) in cell units,
    objectness logit, class logits. ``late_loss`` (an extra size term) only counts once the
    loop has said the no-augmentation epochs started."""

    loss_keys = ("total_loss", "box_loss", "obj_loss", "cls_loss", "late_loss")

    def __init__(self, num_classes, input_size):
        super().__init__()

        def down(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU())

        self.features = nn.Sequential(down(3, 8), down(8, 16), down(16, 24), down(24, 32))
        self.predict = nn.Conv2d(32, 5 + num_classes, 1)
        self.output_mode = "decoded"
        self.late_term = False
        self.meta = {"name": "tiny_grid", "num_classes": int(num_classes),
                     "input_size": [int(v) for v in input_size], "stride": STRIDE}

    @property
    def num_classes(self):
        return self.meta["num_classes"]

    @property
    def input_size(self):
        return tuple(self.meta["input_size"])

    def start_no_augmentation(self):
        self.late_term = True

    def forward(self, images, targets=None):
        raw = self.predict(self.features(images / 255.0)).flatten(2).permute(0, 2, 1)
        if self.training:
            return self.loss(raw, targets, tuple(images.shape[-2:]))
        return raw if self.output_mode == "raw" else self.decode(raw, tuple(images.shape[-2:]))

    @staticmethod
    def cells(input_hw):
        ys, xs = torch.meshgrid(torch.arange(input_hw[0] // STRIDE),
                                torch.arange(input_hw[1] // STRIDE), indexing="ij")
        return torch.stack([xs, ys], -1).reshape(-1, 2).float()

    def decode(self, raw, input_hw):
        raw = raw.float()
        xy = (raw[..., :2].sigmoid() + self.cells(input_hw)) * STRIDE
        wh = raw[..., 2:4].clamp(max=8).exp() * STRIDE
        return torch.cat([xy, wh, raw[..., 4:].sigmoid()], -1)

    def loss(self, raw, targets, input_hw):
        raw = raw.float()
        grid_h, grid_w = input_hw[0] // STRIDE, input_hw[1] // STRIDE
        b, m = (targets[..., 3:5].prod(-1) > 0).nonzero(as_tuple=True)
        gt = targets[b, m].float()
        cx, cy = gt[:, 1] / STRIDE, gt[:, 2] / STRIDE
        gx, gy = cx.floor().clamp(0, grid_w - 1), cy.floor().clamp(0, grid_h - 1)
        cell = (gy * grid_w + gx).long()
        positives = max(int(b.numel()), 1)
        pred = raw[b, cell]
        box_target = torch.stack([cx - gx, cy - gy, (gt[:, 3] / STRIDE).log(),
                                  (gt[:, 4] / STRIDE).log()], 1)
        box_pred = torch.cat([pred[:, :2].sigmoid(), pred[:, 2:4]], 1)
        box = F.l1_loss(box_pred, box_target, reduction="sum") / positives
        obj_target = torch.zeros_like(raw[..., 4])
        obj_target[b, cell] = 1.0
        obj = F.binary_cross_entropy_with_logits(raw[..., 4], obj_target,
                                                 reduction="sum") / positives
        cls_target = F.one_hot(gt[:, 0].long(), self.num_classes).float()
        cls = F.binary_cross_entropy_with_logits(pred[:, 5:], cls_target,
                                                 reduction="sum") / positives
        late = (F.smooth_l1_loss(pred[:, 2:4], box_target[:, 2:], reduction="sum") / positives
                if self.late_term else raw.new_zeros(()))
        return {"total_loss": box + obj + cls + late, "box_loss": box, "obj_loss": obj,
                "cls_loss": cls, "late_loss": late}

    def postprocess(self, decoded, conf_thre=0.001, nms_thre=0.65):
        results = []
        for det in decoded.float():
            cls_score, cls_idx = det[:, 5:].max(1)
            score = det[:, 4] * cls_score
            keep = (score >= conf_thre).nonzero().flatten()
            keep = keep[score[keep].argsort(descending=True)][:100]
            boxes = torch.cat([det[keep, :2] - det[keep, 2:4] / 2,
                               det[keep, :2] + det[keep, 2:4] / 2], 1)
            same = cls_idx[keep, None] == cls_idx[None, keep]
            overlap = (box_iou(boxes, boxes) > nms_thre) & same
            suppressed = torch.zeros(len(keep), dtype=torch.bool)
            kept = []
            for i in range(len(keep)):
                if not suppressed[i]:
                    kept.append(i)
                    suppressed |= overlap[i]
            k = torch.tensor(kept, dtype=torch.long)
            results.append(torch.cat([boxes[k], score[keep][k, None],
                                      cls_idx[keep][k, None].float()], 1).numpy()
                           .astype(np.float32))
        return results


class NotADetector(nn.Module):
    """Has some of the members only: the core must refuse it with one clear line."""

    loss_keys = ("loss",)
    output_mode = "decoded"
    meta = {"name": "tiny_broken"}
    num_classes = 3
    input_size = (64, 64)

    def forward(self, images):
        return images


@accelcore.hookimpl
def accelcore_declare():
    return [Declaration(kind="model", name="tiny_grid", summary="one box per 16-px grid cell"),
            Declaration(kind="model", name="tiny_broken", summary="misses Detector members")]


@accelcore.hookimpl
def accelcore_build_model(config):
    if config.name == "tiny_broken":
        return NotADetector()
    if config.name != "tiny_grid":
        return None
    model = TinyGrid(config.num_classes, config.input_size or (64, 64))
    if config.checkpoint:
        saved = torch.load(config.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(saved.get("model", saved))
    return model
'''


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site-packages-like folder holding the plugin and its entry-point dist-info."""
    root = tmp_path / "site"
    install_on_path(root, "accelcore-tinygrid", "accelcore_tinygrid", TINY_GRID_PLUGIN,
                    version="0.1.0")
    return root


def test_entry_point_model_is_found_built_and_checked(site: Path, monkeypatch,
                                                      fresh_plugins) -> None:
    from accelcore import create_model, list_models

    monkeypatch.syspath_prepend(str(site))
    assert get_plugin_manager().records["accelcore-tinygrid"].version == "0.1.0"
    assert "tiny_grid" in list_models() and list_models("tiny_*") == ["tiny_broken",
                                                                      "tiny_grid"]
    model = create_model("tiny_grid", num_classes=3, input_size=[64, 96])
    assert isinstance(model, Detector) and missing_detector_members(model) == []
    assert model.input_size == (64, 96) and model.num_classes == 3

    # The contract as the core uses it: losses in train mode, raw + decode == decoded in eval.
    images = torch.rand(2, 3, 64, 96) * 255
    targets = torch.zeros(2, 4, 5)
    targets[0, 0] = torch.tensor([1.0, 40, 20, 24, 18])
    targets[1, 0] = torch.tensor([2.0, 70, 40, 30, 20])
    losses = model.train()(images, targets)
    assert set(losses) == set(model.loss_keys) and float(losses["late_loss"].detach()) == 0
    model.start_no_augmentation()
    assert float(model(images, targets)["late_loss"].detach()) > 0
    model.eval()
    with torch.no_grad():
        decoded = model(images)
        model.output_mode = "raw"
        raw = model(images)
    assert raw.shape == decoded.shape == (2, 4 * 6, 8)
    assert torch.equal(model.decode(raw, (64, 96)), decoded)
    dets = model.postprocess(decoded, 0.0, 0.5)
    assert len(dets) == 2 and dets[0].shape[1] == 6 and len(dets[0]) > 0

    with pytest.raises(PluginError) as info:
        create_model("tiny_broken")
    message = str(info.value)
    assert "\n" not in message and "model.name" in message and "'tiny_broken'" in message
    for member in ("decode", "postprocess", "start_no_augmentation", "'total_loss' in loss_keys"):
        assert member in message, member
    assert "meta" not in message.split("missing", 1)[1]  # only what is really missing


def _epochs(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "epochs.csv").open()))


@pytest.mark.slow
def test_third_party_detector_trains_accelerates_validates_predicts(site: Path,
                                                                     tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: tinygrid
        stages: [train, validate]
        model: {{name: tiny_grid, num_classes: 3, input_size: [64, 64]}}
        data:
          num_workers: 0
          synthetic: {{images: 16, val_images: 8, size: 64, num_classes: 3,
                       cache_dir: {cache}}}
          augment: {{multiscale_range: 0}}
        train:
          batch_size: 4
          epochs: 2
          no_aug_epochs: 1
          warmup_epochs: 0
          eval_interval: 1
          quiet: true
        validate: {{batch_size: 8}}
    """))
    trained = tmp_path / "train"
    proc = run_cli("run", str(recipe), "--out", str(trained), env_path=site)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The loop logged this model's own loss parts and told it when augmentation stopped.
    epochs = _epochs(trained)
    assert [int(r["epoch"]) for r in epochs] == [1, 2]
    assert {"box_loss", "obj_loss", "cls_loss", "late_loss"} <= set(epochs[0])
    assert "iou_loss" not in epochs[0]
    assert [int(r["no_aug"]) for r in epochs] == [0, 1]
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["box_loss"] > 0 for r in rows)
    assert all(r["late_loss"] == 0 for r in rows if r["epoch"] == 1)
    assert all(r["late_loss"] > 0 for r in rows if r["epoch"] == 2)
    best = trained / "checkpoints" / "best.pth"
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["meta"]["name"] == "tiny_grid" and checkpoint["meta"]["stride"] == 16
    validated = json.loads((trained / "validate.json").read_text())
    assert 0.0 <= validated["ap50_95"] <= 1.0

    # optimize: name/classes/size from the checkpoint's meta (no plugin claims it), then the
    # accelerate stage: the methods convert the raw-output model, the shared predictor scores.
    optimized = tmp_path / "optimize"
    proc = run_cli("optimize", "--model", str(best), "--methods", "original,jit_fp32",
                   "--out", str(optimized),
                   "--set", f"data.synthetic={{images: 16, val_images: 8, size: 64, "
                            f"num_classes: 3, cache_dir: {cache}}}",
                   "--set", "accelerate.isolate=false", "--set", "accelerate.batch_size=4",
                   "--set", "accelerate.calibration_images=4", "--set", "accelerate.save=all",
                   "--set", "accelerate.latency={warmup: 1, min_runs: 2, min_seconds: 0.05}",
                   env_path=site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((optimized / "report.json").read_text())
    by_name = {m["method"]: m for m in report["methods"]}
    for method in ("original", "jit_fp32"):
        assert by_name[method]["status"] == "ok", by_name[method]
        assert by_name[method]["latency_ms"] > 0
    # Same weights, same decode + NMS: the traced graph scores like the eager model.
    assert abs(by_name["jit_fp32"]["ap50_95"] - by_name["original"]["ap50_95"]) < 1e-3
    assert abs(by_name["original"]["ap50_95"] - validated["ap50_95"]) < 1e-3
    manifest = json.loads((optimized / "artifacts" / "jit_fp32" / "manifest.json").read_text())
    assert manifest["model"]["name"] == "tiny_grid" and manifest["input_size"] == [64, 64]

    # predict: the artifact's decode/NMS come from the plugin again, through create_model.
    image = next(cache.glob("*/val2017/*.jpg"))
    predictions = tmp_path / "predictions"
    proc = run_cli("predict", "--model", str(optimized / "artifacts" / "jit_fp32"),
                   "--source", str(image), "--out", str(predictions), "--conf", "0.0",
                   env_path=site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    detections = json.loads((predictions / "detections.json").read_text())
    assert detections and all(d["image"] == image.name for d in detections)
