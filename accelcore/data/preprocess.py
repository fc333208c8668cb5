"""YOLOX inference preprocessing: keep-ratio letterbox, BGR 0-255, no mean/std.

The same function feeds evaluation, inference and backend calibration, so that every path sees
exactly the pixels the model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

PAD_VALUE = 114


def letterbox_hwc(img: np.ndarray, input_size: Sequence[int]) -> tuple[np.ndarray, float]:
    """Keep-ratio resize into an ``input_size`` (H, W) canvas, top-left placed, padded with 114.

    Returns the uint8 HWC canvas and the resize ratio (network pixels per original pixel).
    """
    if img.ndim == 2:  # grayscale: the model wants 3 channels
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    out_h, out_w = int(input_size[0]), int(input_size[1])
    h, w = img.shape[:2]
    ratio = min(out_h / h, out_w / w)
    # int() truncation as in YOLOX's preproc; max(1, …) keeps extreme aspect ratios usable.
    new_w, new_h = max(1, int(w * ratio)), max(1, int(h * ratio))
    canvas = np.full((out_h, out_w, 3), PAD_VALUE, dtype=np.uint8)
    if (new_h, new_w) != (h, w):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    canvas[:new_h, :new_w] = img[:, :, :3]
    return canvas, ratio


def letterbox(img: np.ndarray, input_size: Sequence[int]) -> tuple[np.ndarray, float]:
    """YOLOX ``preproc``: letterbox to (H, W) and return a CHW float32 array plus the ratio."""
    canvas, ratio = letterbox_hwc(img, input_size)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32), ratio


def preprocess_batch(
    images: Sequence[np.ndarray], input_size: Sequence[int]
) -> tuple[torch.Tensor, list[float]]:
    """Letterbox each BGR uint8 image and stack them into a float32 tensor ``[B, 3, H, W]``."""
    if len(images) == 0:
        raise ValueError("preprocess_batch needs at least one image")
    arrays, ratios = zip(*(letterbox(img, input_size) for img in images), strict=True)
    return torch.from_numpy(np.stack(arrays)), list(ratios)
