"""YOLOX ``MosaicDetection``: mosaic of 4 images + random affine + mixup, then ``TrainTransform``.

Items are ``(image_hwc_uint8, targets [max_labels, 5], (H, W), image_id)`` with targets
``(class, cx, cy, w, h)`` in input pixels — fixed shapes, ready for the training collate.

An image file that cannot be read (:class:`~accelcore.errors.ImageReadError` from the wrapped
dataset) stops training by default; with ``on_bad_image="skip"`` (recipe key
``data.on_bad_image``) that sample is replaced by the next readable index — the same one on
every run, rank and worker — and a warning naming the file is logged once per file (per
process: each loader worker reports what it meets).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from accelcore.data.augment import (
    TrainTransform,
    affine_matrix,
    mixup,
    source_window,
    warp_affine,
)
from accelcore.data.preprocess import PAD_VALUE
from accelcore.errors import DataError, ImageReadError

log = logging.getLogger(__name__)
#: Values of ``data.on_bad_image``.
ON_BAD_IMAGE = ("fail", "skip")

# Recipe keys consumed by MosaicDetection / TrainTransform (multiscale_* belong to the trainer).
AUGMENT_KEYS = (
    "mosaic_prob",
    "mixup_prob",
    "hsv_prob",
    "flip_prob",
    "degrees",
    "translate",
    "mosaic_scale",
    "mixup_scale",
    "shear",
    "enable_mixup",
    "max_labels",
)


def mosaic_tile(
    index: int, xc: int, yc: int, w: int, h: int, input_h: int, input_w: int
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Where tile ``index`` (0 TL, 1 TR, 2 BL, 3 BR) of size (h, w) lands around centre (xc, yc)
    in the 2H x 2W mosaic: ``(dst x1, y1, x2, y2), (src x1, y1, x2, y2)`` of equal sizes.
    """
    if index == 0:
        dst = (max(xc - w, 0), max(yc - h, 0), xc, yc)
        src = (w - (dst[2] - dst[0]), h - (dst[3] - dst[1]), w, h)
    elif index == 1:
        dst = (xc, max(yc - h, 0), min(xc + w, input_w * 2), yc)
        src = (0, h - (dst[3] - dst[1]), min(w, dst[2] - dst[0]), h)
    elif index == 2:
        dst = (max(xc - w, 0), yc, xc, min(input_h * 2, yc + h))
        src = (w - (dst[2] - dst[0]), 0, w, min(dst[3] - dst[1], h))
    elif index == 3:
        dst = (xc, yc, min(xc + w, input_w * 2), min(input_h * 2, yc + h))
        src = (0, 0, min(w, dst[2] - dst[0]), min(dst[3] - dst[1], h))
    else:
        raise ValueError(f"mosaic tile index must be 0..3, got {index}")
    return dst, src


def build_mosaic(
    items: Sequence[tuple[np.ndarray, np.ndarray]],
    input_hw: Sequence[int],
    xc: int,
    yc: int,
    window: tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste 4 (image, boxes) pairs, each resized to fit ``input_hw``, around (xc, yc) in a
    2H x 2W canvas; boxes are moved with their tile and clipped to the canvas.

    With ``window`` ``(x1, y1, x2, y2)`` only that part of the canvas is filled in (the rest is
    left uninitialised): all the mosaic's affine warp reads (:func:`source_window`), often
    under half of the canvas. The boxes are the same either way.
    """
    input_h, input_w = int(input_hw[0]), int(input_hw[1])
    if window is None:
        window = (0, 0, input_w * 2, input_h * 2)
        canvas = np.full((input_h * 2, input_w * 2, 3), PAD_VALUE, dtype=np.uint8)
    else:
        canvas = np.empty((input_h * 2, input_w * 2, 3), dtype=np.uint8)
        canvas[window[1]:window[3], window[0]:window[2]] = PAD_VALUE
    wx1, wy1, wx2, wy2 = window
    all_boxes = []
    for i, (img, boxes) in enumerate(items):
        h0, w0 = img.shape[:2]
        s = min(input_h / h0, input_w / w0)
        size = (max(1, int(w0 * s)), max(1, int(h0 * s)))
        if size != (w0, h0):  # at the same size OpenCV would only copy
            img = cv2.resize(img, size, interpolation=cv2.INTER_LINEAR)
        h, w = img.shape[:2]
        (dx1, dy1, dx2, dy2), (sx1, sy1, sx2, sy2) = mosaic_tile(i, xc, yc, w, h, input_h, input_w)
        px1, py1, px2, py2 = max(dx1, wx1), max(dy1, wy1), min(dx2, wx2), min(dy2, wy2)
        if px1 < px2 and py1 < py2:  # the tile's part inside the window
            canvas[py1:py2, px1:px2] = img[sy1 + py1 - dy1 : sy1 + py2 - dy1,
                                           sx1 + px1 - dx1 : sx1 + px2 - dx1]
        if len(boxes):
            moved = np.asarray(boxes, dtype=np.float32).copy()
            moved[:, [0, 2]] = moved[:, [0, 2]] * s + (dx1 - sx1)
            moved[:, [1, 3]] = moved[:, [1, 3]] * s + (dy1 - sy1)
            # Parts of a box that fall on a neighbouring tile are not this tile's pixels.
            moved[:, [0, 2]] = moved[:, [0, 2]].clip(dx1, dx2)
            moved[:, [1, 3]] = moved[:, [1, 3]].clip(dy1, dy2)
            all_boxes.append(moved)
    boxes_out = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 5), np.float32)
    return canvas, boxes_out


class MosaicDetection:
    """Training wrapper around a detection dataset (``pull_item`` / ``__getitem__`` items).

    ``__getitem__`` accepts an index or ``(index, seed[, mosaic])``; with a seed the augmentation
    is a pure function of it (the training loader passes one per sample and epoch).
    ``close_mosaic()`` switches to plain ``TrainTransform`` for YOLOX's last ``no_aug_epochs``.
    """

    def __init__(
        self,
        dataset: Any,
        input_size: Sequence[int],
        mosaic: bool = True,
        mosaic_prob: float = 1.0,
        mixup_prob: float = 1.0,
        hsv_prob: float = 1.0,
        flip_prob: float = 0.5,
        degrees: float = 10.0,
        translate: float = 0.1,
        mosaic_scale: Sequence[float] = (0.1, 2.0),
        mixup_scale: Sequence[float] = (0.5, 1.5),
        shear: float = 2.0,
        enable_mixup: bool = True,
        max_labels: int = 50,
        preproc: TrainTransform | None = None,
        on_bad_image: str = "fail",
    ) -> None:
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        self._dataset = dataset
        self.on_bad_image = on_bad_image
        self._bad: dict[int, str] = {}  # index -> file, of the unreadable images met so far
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.enable_mosaic = bool(mosaic)
        self.mosaic_prob = float(mosaic_prob)
        self.mixup_prob = float(mixup_prob)
        self.degrees = degrees
        self.translate = translate
        self.mosaic_scale = tuple(mosaic_scale)
        self.mixup_scale = tuple(mixup_scale)
        self.shear = shear
        self.enable_mixup = bool(enable_mixup)
        self.preproc = preproc or TrainTransform(max_labels, flip_prob=flip_prob, hsv_prob=hsv_prob)
        self._rng = np.random.default_rng()

    @classmethod
    def from_config(
        cls, dataset: Any, input_size: Sequence[int], augment: Any, mosaic: bool = True,
        on_bad_image: str = "fail",
    ) -> MosaicDetection:
        """Build from a recipe's augment section (an object with attributes, or a mapping)."""
        get = augment.get if isinstance(augment, dict) else lambda k, d=None: getattr(augment, k, d)
        kwargs = {k: get(k) for k in AUGMENT_KEYS if get(k) is not None}
        return cls(dataset, input_size, mosaic=mosaic, on_bad_image=on_bad_image, **kwargs)

    # Attributes the engine and evaluation look for on any dataset.
    @property
    def dataset(self) -> Any:
        return self._dataset

    def __getattr__(self, name: str) -> Any:
        # class_names, num_classes, coco, cat_ids, ids… come from the wrapped dataset.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._dataset, name)

    def __len__(self) -> int:
        return len(self._dataset)

    def close_mosaic(self) -> None:
        """Turn mosaic (and with it mixup) off for the final no-augmentation epochs."""
        self.enable_mosaic = False

    def _pull(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int], int]:
        if self.on_bad_image == "fail":
            return self._pull_raw(index)
        n = len(self._dataset)
        # Deterministic replacement: the next index that reads (a function of the index only,
        # so runs, ranks and worker counts agree); known-bad indices are not decoded again.
        for step in range(n):
            candidate = (index + step) % n
            if candidate in self._bad:
                continue
            try:
                return self._pull_raw(candidate)
            except ImageReadError as exc:
                self._bad[candidate] = exc.path
                log.warning("data.on_bad_image=skip: %s; its samples use the next readable "
                            "image", exc)
        raise DataError(f"data.on_bad_image=skip: no image of the {n} in the dataset can be "
                        f"read (e.g. {next(iter(self._bad.values()), '?')})")

    def _pull_raw(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int], int]:
        pull = getattr(self._dataset, "pull_item", None)
        return pull(index) if pull is not None else self._dataset[index]

    def _annotations(self, index: int) -> np.ndarray:
        load = getattr(self._dataset, "load_anno", None)
        return load(index) if load is not None else self._pull(index)[1]

    def __getitem__(
        self, key: int | tuple[int, int] | tuple[int, int, bool]
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int], int]:
        mosaic = self.enable_mosaic
        if isinstance(key, tuple):
            # (index, seed[, mosaic]) from the training sampler: the flag comes from the main
            # process, so close_mosaic() there also reaches persistent worker processes.
            index, seed = int(key[0]), int(key[1])
            if len(key) > 2:
                mosaic = bool(key[2]) and mosaic
            rng = np.random.default_rng(seed)
        else:
            index, rng = int(key), self._rng
        input_h, input_w = self.input_size
        n = len(self._dataset)

        if mosaic and rng.random() < self.mosaic_prob:
            yc = int(rng.uniform(0.5 * input_h, 1.5 * input_h))
            xc = int(rng.uniform(0.5 * input_w, 1.5 * input_w))
            indices = [index] + [int(i) for i in rng.integers(0, n, 3)]
            pulled = [self._pull(i) for i in indices]
            img_id = pulled[0][3]
            # The warp is drawn first (build_mosaic draws nothing, so the sequence is as
            # before): the canvas is then filled only where the warp will read it.
            canvas_hw = (2 * input_h, 2 * input_w)
            m, scale = affine_matrix(canvas_hw, self.input_size, self.degrees, self.translate,
                                     self.mosaic_scale, self.shear, rng)
            window = source_window(m, self.input_size, canvas_hw)
            canvas, boxes = build_mosaic([(p[0], p[1]) for p in pulled], self.input_size, xc, yc,
                                         window)
            img, boxes = warp_affine(canvas, boxes, m, scale, self.input_size)
            if self.enable_mixup and len(boxes) and rng.random() < self.mixup_prob:
                img, boxes = self._mixup(img, boxes, rng)
        else:
            img, boxes, _, img_id = self._pull(index)
        image, targets = self.preproc(img, boxes, self.input_size, rng)
        return image, targets, self.input_size, img_id

    def _mixup(
        self, img: np.ndarray, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        n = len(self._dataset)
        # YOLOX draws until it finds a labelled image; bounded here so a dataset of background
        # images cannot hang the worker.
        for _ in range(32):
            cp_index = int(rng.integers(0, n))
            if len(self._annotations(cp_index)):
                cp_img, cp_boxes, _, _ = self._pull(cp_index)
                return mixup(img, boxes, cp_img, cp_boxes, self.input_size, self.mixup_scale, rng)
        return img, boxes
