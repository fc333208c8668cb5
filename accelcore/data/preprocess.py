"""YOLOX inference preprocessing: keep-ratio letterbox, BGR 0-255, no mean/std.

The same function feeds evaluation, inference and backend calibration, so that every path sees
exactly the pixels the model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from accelcore.errors import ImageReadError, one_line

PAD_VALUE = 114


def read_image(path: str | Path) -> np.ndarray:
    """The BGR uint8 HWC image in file ``path`` (any format OpenCV decodes).

    Raises :class:`~accelcore.errors.ImageReadError` naming the file when it cannot be read
    (missing, unreadable) or decoded (empty, truncated header, not an image). Reading the bytes
    first tells the two apart; both the read and OpenCV's decode release the GIL, so threads
    overlap them.
    """
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        reason = exc.strerror or one_line(exc)
        raise ImageReadError(f"cannot read image {path}: {reason}", str(path)) from None
    if data.size == 0:
        raise ImageReadError(f"cannot decode image {path}: empty file", str(path))
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        raise ImageReadError(f"cannot decode image {path}: not an image OpenCV can decode",
                             str(path))
    return img


def letterbox_hwc(img: np.ndarray, input_size: Sequence[int]) -> tuple[np.ndarray, float]:
    """Keep-ratio resize into an ``input_size`` (H, W) canvas, top-left placed, padded with 114.

    Returns the uint8 HWC canvas and the resize ratio (network pixels per original pixel). An
    image that already is ``input_size`` with 3 channels (every mosaic training sample) is
    returned itself, ratio 1: the canvas would be the same pixels, copied.
    """
    if img.ndim == 2:  # grayscale: the model wants 3 channels
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    out_h, out_w = int(input_size[0]), int(input_size[1])
    if img.shape == (out_h, out_w, 3):
        return img, 1.0
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
