"""COCO box evaluation with pycocotools.

``COCOEvaluator`` scores detections already in original-image coordinates;
``evaluate_predictor`` runs a predictor over a dataset (letterboxed batches), maps its boxes back
to each original image and evaluates exactly the images it saw.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from accelcore.data.loader import build_eval_loader
from accelcore.errors import DataError

log = logging.getLogger(__name__)

Predictor = Callable[[Any], Sequence[Any]]
# COCOeval.stats order for the box metrics reported here.
_STAT_KEYS = ("ap50_95", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
_AR_KEYS = ("ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


def _as_numpy(dets: Any) -> np.ndarray:
    if dets is None:
        return np.zeros((0, 6), dtype=np.float32)
    if hasattr(dets, "detach"):  # torch tensor
        dets = dets.detach().cpu().numpy()
    arr = np.asarray(dets, dtype=np.float32)
    if arr.size == 0:
        return np.zeros((0, 6), dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] < 6:
        raise DataError(f"detections must be (K, 6) x1,y1,x2,y2,score,class; got {arr.shape}")
    return arr


class COCOEvaluator:
    """Collects detections (original-image pixels) and runs COCOeval on chosen images.

    ``class_index`` in the detections is the dataset's contiguous index; ``cat_ids`` maps it to
    the COCO category id.
    """

    def __init__(self, coco_gt: COCO, cat_ids: Sequence[int], class_names: Sequence[str]):
        self.coco_gt = coco_gt
        self.cat_ids = [int(c) for c in cat_ids]
        self.class_names = list(class_names)
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self._seen: set[int] = set()

    @classmethod
    def for_dataset(cls, dataset: Any) -> COCOEvaluator:
        return cls(dataset.coco, dataset.cat_ids, dataset.class_names)

    def add(
        self, image_id: int, detections: Any, image_hw: Sequence[int] | None = None
    ) -> int:
        """Add one image's ``(K, 6)`` detections ``x1, y1, x2, y2, score, class_index``.

        Boxes are clipped to ``image_hw`` (h, w) when given. The image counts as evaluated even
        with no detections. Returns the number of detections kept.
        """
        image_id = int(image_id)
        if image_id not in self._seen:
            self._seen.add(image_id)
            self.image_ids.append(image_id)
        dets = _as_numpy(detections)
        if len(dets) == 0:
            return 0
        boxes = dets[:, :4].astype(np.float64)
        if image_hw is not None:
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, image_hw[1])
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, image_hw[0])
        classes = dets[:, 5].astype(np.int64)
        bad = (classes < 0) | (classes >= len(self.cat_ids))
        if bad.any():
            raise DataError(
                f"detection class index {int(classes[bad][0])} on image {image_id} is outside the "
                f"dataset's {len(self.cat_ids)} classes (model and dataset class counts differ?)"
            )
        wh = boxes[:, 2:4] - boxes[:, 0:2]
        for (x1, y1), (w, h), score, cls in zip(boxes[:, :2], wh, dets[:, 4], classes, strict=True):
            self.results.append({
                "image_id": image_id,
                "category_id": self.cat_ids[int(cls)],
                "bbox": [round(float(x1), 2), round(float(y1), 2),
                         round(float(w), 2), round(float(h), 2)],
                "score": round(float(score), 5),
            })
        return len(dets)

    def evaluate(self, image_ids: Iterable[int] | None = None) -> dict:
        """COCO metrics over ``image_ids`` (default: every image passed to :meth:`add`).

        Values are COCO's: -1.0 marks a size range without ground truth. ``per_class`` holds
        AP50:95 for each class that has ground truth among the evaluated images.
        """
        ids = [int(i) for i in (image_ids if image_ids is not None else self.image_ids)]
        metrics: dict[str, Any] = {k: 0.0 for k in _STAT_KEYS + _AR_KEYS}
        metrics.update(per_class={}, num_images=len(ids), num_detections=0, summary="")
        if not ids:
            return metrics
        id_set = set(ids)
        results = [r for r in self.results if r["image_id"] in id_set]
        metrics["num_detections"] = len(results)
        gt_cats = {
            a["category_id"]
            for i in ids
            for a in self.coco_gt.imgToAnns.get(i, [])
            if not a.get("iscrowd", 0)
        }
        names = {cid: self.class_names[k] for k, cid in enumerate(self.cat_ids)}
        if not results:
            # pycocotools cannot load an empty result list; with nothing detected AP is 0.
            metrics["per_class"] = {names[c]: 0.0 for c in self.cat_ids if c in gt_cats}
            return metrics

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            # loadRes adds area/id/segmentation to the dicts it gets: give it copies.
            coco_dt = self.coco_gt.loadRes([dict(r) for r in results])
            ev = COCOeval(self.coco_gt, coco_dt, "bbox")
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        summary = out.getvalue()
        summary = summary[summary.find(" Average Precision") :] if "Average" in summary else ""
        for k, v in zip(_STAT_KEYS + _AR_KEYS, ev.stats, strict=True):
            metrics[k] = float(v)
        metrics["summary"] = summary.rstrip()

        # precision: [iou thresholds, recall points, categories, area ranges, max dets]
        precision = ev.eval["precision"]
        per_class = {}
        for k, cid in enumerate(ev.params.catIds):
            if cid not in gt_cats or cid not in names:
                continue
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_class[names[cid]] = float(p.mean()) if p.size else 0.0
        metrics["per_class"] = per_class
        return metrics

    def write(self, out_dir: str | Path, metrics: dict) -> list[Path]:
        """Write ``detections.json`` (COCO results format) and ``per_class_ap.csv``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        det_path = out / "detections.json"
        with open(det_path, "w") as f:
            json.dump(self.results, f)
        csv_path = out / "per_class_ap.csv"
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["class", "ap50_95"])
            for name, ap in metrics.get("per_class", {}).items():
                writer.writerow([name, f"{ap:.6f}"])
        return [det_path, csv_path]


def evaluate_predictor(
    predictor: Predictor,
    dataset: Any,
    input_size: Sequence[int],
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    progress: bool = True,
    max_images: int | None = None,
    num_workers: int = 0,
) -> dict:
    """Run ``predictor`` over ``dataset`` and return COCO metrics.

    ``predictor(images float32 [B,3,H,W]) -> list of (K, 6) arrays`` (x1, y1, x2, y2, score,
    class_index) in network-input pixels. Result keys: ``ap50_95, ap50, ap75, ap_small,
    ap_medium, ap_large`` (+ ``ar*``), ``per_class``, ``num_images``, ``num_detections``,
    ``predictor_seconds``, ``total_seconds``, ``predictor_images_per_second``.
    """
    t_start = time.perf_counter()
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    if n == 0:
        raise DataError("evaluation dataset has no images")
    evaluator = COCOEvaluator.for_dataset(dataset)
    loader = build_eval_loader(dataset, batch_size, input_size, num_workers, indices=range(n))
    t_pred = 0.0
    bar = tqdm(total=n, desc="eval", unit="img", disable=not progress, leave=False)
    try:
        for images, ratios, ids, sizes in loader:
            t0 = time.perf_counter()
            outputs = predictor(images)
            t_pred += time.perf_counter() - t0
            if len(outputs) != len(ids):
                raise DataError(
                    f"predictor returned {len(outputs)} results for a batch of {len(ids)} images"
                )
            for dets, ratio, img_id, hw in zip(outputs, ratios, ids, sizes, strict=True):
                dets = _as_numpy(dets).copy()
                dets[:, :4] /= ratio  # network-input pixels -> original pixels
                evaluator.add(img_id, dets, hw)
            bar.update(len(ids))
    finally:
        bar.close()
    metrics = evaluator.evaluate()
    total = time.perf_counter() - t_start
    metrics.update(
        predictor_seconds=t_pred,
        total_seconds=total,
        predictor_images_per_second=n / t_pred if t_pred > 0 else 0.0,
    )
    if metrics["summary"]:
        log.info("COCO evaluation on %d images:\n%s", n, metrics["summary"])
    if out_dir is not None:
        evaluator.write(out_dir, metrics)
    return metrics
