"""COCO evaluation: perfect/shifted/empty detections and the predictor path end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from accelcore.data.coco import COCODataset
from accelcore.errors import DataError
from accelcore.evaluation import COCOEvaluator, evaluate_predictor

COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}  # class index -> BGR
CATS = [{"id": 5, "name": "blue"}, {"id": 9, "name": "green"}, {"id": 20, "name": "red"}]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> COCODataset:
    """Black images of various sizes with pure-colour rectangles (PNG, lossless)."""
    root = tmp_path_factory.mktemp("evalds")
    (root / "val2017").mkdir()
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    for img_id in range(1, 9):
        h, w = int(rng.integers(120, 400)), int(rng.integers(120, 400))
        img = np.zeros((h, w, 3), np.uint8)
        for cls in range(3):
            bw, bh = int(rng.integers(w // 8, w // 4)), int(rng.integers(h // 8, h // 4))
            x = int(cls * w / 3 + rng.integers(0, w / 3 - bw))
            y = int(rng.integers(0, h - bh))
            img[y : y + bh, x : x + bw] = COLOURS[cls]
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": CATS[cls]["id"],
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
        cv2.imwrite(str(root / "val2017" / f"{img_id}.png"), img)
        images.append({"id": img_id, "file_name": f"{img_id}.png", "height": h, "width": w})
    doc = {"images": images, "annotations": anns, "categories": CATS}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    return COCODataset(root, "val2017", "instances_val2017.json")


def gt_detections(ds: COCODataset, index: int, shift: float = 0.0) -> np.ndarray:
    boxes = ds.load_anno(index)
    dets = np.zeros((len(boxes), 6), np.float32)
    dets[:, :4] = boxes[:, :4] + shift
    dets[:, 4] = 0.9
    dets[:, 5] = boxes[:, 4]
    return dets


def test_perfect_detections_score_one(dataset: COCODataset) -> None:
    ev = COCOEvaluator.for_dataset(dataset)
    for i, img_id in enumerate(dataset.ids):
        ev.add(img_id, gt_detections(dataset, i))
    m = ev.evaluate()
    assert m["ap50_95"] == pytest.approx(1.0) and m["ap50"] == pytest.approx(1.0)
    assert m["per_class"] == pytest.approx({"blue": 1.0, "green": 1.0, "red": 1.0})
    assert m["num_images"] == 8 and m["num_detections"] == 24
    # Category ids are mapped from class indices (5, 9, 20), not used raw.
    assert {r["category_id"] for r in ev.results} == {5, 9, 20}


def test_shifted_boxes_score_lower(dataset: COCODataset) -> None:
    scores = []
    for shift in (0.0, 4.0, 12.0):
        ev = COCOEvaluator.for_dataset(dataset)
        for i, img_id in enumerate(dataset.ids):
            ev.add(img_id, gt_detections(dataset, i, shift))
        scores.append(ev.evaluate()["ap50_95"])
    assert scores[0] > scores[1] > scores[2] >= 0.0 and scores[1] < 0.95


def test_empty_detections_score_zero(dataset: COCODataset) -> None:
    ev = COCOEvaluator.for_dataset(dataset)
    for img_id in dataset.ids:
        ev.add(img_id, np.zeros((0, 6), np.float32))
    m = ev.evaluate()
    assert m["ap50_95"] == 0.0 and m["ap50"] == 0.0 and m["num_detections"] == 0
    assert m["num_images"] == 8 and m["per_class"] == {"blue": 0.0, "green": 0.0, "red": 0.0}


def test_evaluates_only_given_images(dataset: COCODataset) -> None:
    ev = COCOEvaluator.for_dataset(dataset)
    ev.add(dataset.ids[0], gt_detections(dataset, 0))  # perfect on the one image seen
    m = ev.evaluate()
    assert m["num_images"] == 1 and m["ap50_95"] == pytest.approx(1.0)


def colour_detector(images: torch.Tensor) -> list[np.ndarray]:
    """A 'model' that finds the pure-colour rectangles in the letterboxed input pixels."""
    out = []
    for img in images.numpy():
        dets = []
        for cls in range(3):
            others = [c for c in range(3) if c != cls]
            mask = (img[cls] > 160) & (img[others[0]] < 90) & (img[others[1]] < 90)
            ys, xs = np.nonzero(mask)
            if len(xs):
                dets.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.8, cls])
        out.append(np.array(dets, np.float32).reshape(-1, 6))
    return out


def test_evaluate_predictor_rescales_to_original(dataset: COCODataset, tmp_path: Path) -> None:
    m = evaluate_predictor(colour_detector, dataset, (160, 192), batch_size=3,
                           out_dir=tmp_path, progress=False)
    # Found in 160x192 letterboxed pixels; only correct if mapped back through 1/ratio.
    assert m["ap50"] == pytest.approx(1.0) and m["ap50_95"] > 0.75
    assert m["num_images"] == 8 and m["num_detections"] == 24
    assert 0 < m["predictor_seconds"] <= m["total_seconds"]
    dets = json.loads((tmp_path / "detections.json").read_text())
    assert len(dets) == 24 and set(dets[0]) == {"image_id", "category_id", "bbox", "score"}
    rows = list(csv.reader((tmp_path / "per_class_ap.csv").open()))
    assert rows[0] == ["class", "ap50_95"] and {r[0] for r in rows[1:]} == {"blue", "green", "red"}


def test_evaluate_predictor_max_images_empty_and_tensor_output(dataset: COCODataset) -> None:
    calls = []

    def nothing(images: torch.Tensor) -> list[torch.Tensor]:
        calls.append(images.shape)
        return [torch.zeros(0, 6) for _ in range(len(images))]

    m = evaluate_predictor(nothing, dataset, (64, 64), batch_size=2, progress=False,
                           max_images=3)
    assert m["ap50_95"] == 0.0 and m["num_images"] == 3 and m["num_detections"] == 0
    assert calls == [(2, 3, 64, 64), (1, 3, 64, 64)]


def test_bad_predictor_output_is_a_clear_error(dataset: COCODataset) -> None:
    def wrong_class(images: torch.Tensor) -> list[np.ndarray]:
        return [np.array([[0, 0, 5, 5, 0.5, 7]], np.float32) for _ in range(len(images))]

    with pytest.raises(DataError, match="class index 7 .* 3 classes"):
        evaluate_predictor(wrong_class, dataset, (64, 64), progress=False)
    with pytest.raises(DataError, match="returned 1 results for a batch of 2"):
        evaluate_predictor(lambda x: [None], dataset, (64, 64), batch_size=2, progress=False)
