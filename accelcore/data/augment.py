"""YOLOX training augmentations: HSV jitter, horizontal flip, random affine, mixup, TrainTransform.

Boxes are ``[K, 5]`` float arrays ``(x1, y1, x2, y2, class_index)`` in pixels of the image they
belong to; every geometric operation moves the boxes with exactly the transform applied to the
pixels. Randomness comes from an explicit ``numpy.random.Generator`` so that a data loader can make
each sample's augmentation a pure function of (seed, epoch, rank, position).

Behaviour follows the official YOLOX (Megvii-BaseDetection/YOLOX, ``yolox/data/data_augment.py``
and ``mosaicdetection.py``) with one deliberate difference: the mosaic affine warp rotates and
scales about the mosaic centre and keeps the centre in view (YOLOX 0.1's ``random_perspective``
with a border) rather than about the top-left corner as the later ``random_affine`` does.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np

from accelcore.data.preprocess import PAD_VALUE, letterbox_hwc

log = logging.getLogger(__name__)

Range = float | Sequence[float]


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


def _uniform(rng: np.random.Generator, value: Range, center: float = 0.0) -> float:
    """YOLOX ``get_aug_params``: a float v means U(center - v, center + v); a pair means U(a, b)."""
    if isinstance(value, (int, float)):
        return float(rng.uniform(center - value, center + value))
    if len(value) == 2:
        return float(rng.uniform(value[0], value[1]))
    raise ValueError(f"augmentation range must be a number or a pair, got {value!r}")


def xyxy_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
    out = np.empty_like(boxes)
    out[:, 0] = (boxes[:, 0] + boxes[:, 2]) * 0.5
    out[:, 1] = (boxes[:, 1] + boxes[:, 3]) * 0.5
    out[:, 2] = boxes[:, 2] - boxes[:, 0]
    out[:, 3] = boxes[:, 3] - boxes[:, 1]
    return out


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    out = np.empty_like(boxes)
    out[:, 0] = boxes[:, 0] - boxes[:, 2] * 0.5
    out[:, 1] = boxes[:, 1] - boxes[:, 3] * 0.5
    out[:, 2] = boxes[:, 0] + boxes[:, 2] * 0.5
    out[:, 3] = boxes[:, 1] + boxes[:, 3] * 0.5
    return out


#: Set to ``0`` to jitter HSV with OpenCV calls instead of the one-pass kernel (same pixels).
NATIVE_HSV_ENV = "ACCELCORE_NATIVE_HSV"


def augment_hsv(
    img: np.ndarray,
    hgain: float = 5,
    sgain: float = 30,
    vgain: float = 30,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """``img`` (BGR uint8) with an additive HSV jitter; each of H, S, V is switched on with
    probability 1/2. Returns a new array: ``img`` itself is left as it was."""
    rng = _rng(rng)
    gains = rng.uniform(-1, 1, 3) * np.array([hgain, sgain, vgain])
    gains = (gains * rng.integers(0, 2, 3)).astype(np.int16)
    kernel = hsv_kernel()
    if kernel is not None:
        return kernel(img, int(gains[0]), int(gains[1]), int(gains[2]))
    return hsv_jitter_opencv(img, gains)


def hsv_jitter_opencv(img: np.ndarray, gains: Sequence[int]) -> np.ndarray:
    """YOLOX's jitter by integer ``gains`` (dh, ds, dv) with OpenCV calls: the reference."""
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    if any(gains):
        # One single-channel lookup per shifted channel: OpenCV's 3-channel cv2.LUT took 0.47 ms
        # per 416 px image against 0.05 ms per channel (2-core Zen 4), and a zero shift is the
        # identity (8-bit hue is < 180), so those channels are not touched. Same pixels.
        x = np.arange(256, dtype=np.int16)
        shifted = ((x + gains[0]) % 180, np.clip(x + gains[1], 0, 255),
                   np.clip(x + gains[2], 0, 255))
        channels = list(cv2.split(hsv))
        for k, table in enumerate(shifted):
            if gains[k]:
                cv2.LUT(channels[k], table.astype(np.uint8), dst=channels[k])
        cv2.merge(channels, dst=hsv)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=hsv)


@functools.cache
def hsv_kernel() -> Callable[[np.ndarray, int, int, int], np.ndarray] | None:
    """The one-pass HSV jitter (``hsv_jitter.cpp``, ~3x faster than the OpenCV calls) when it
    builds here and gives the installed OpenCV's pixels on a colour probe; else None.

    OpenCV converts the start of each row with vector code and the last ``width % N`` pixels
    with scalar code that rounds differently; N, its vector width on this CPU, is found here by
    trying the widths OpenCV has. Called in the main process when a transform is made, so
    forked loader workers inherit the checked kernel.
    """
    if os.environ.get(NATIVE_HSV_ENV, "1") == "0":
        return None
    from accelcore.training import native  # the project's C++ build, keyed by CPU and torch

    module = native.build("hsv_jitter", Path(__file__).parent, exact_float=True)
    if module is None:
        return None
    probe = _colour_probe()
    gain_sets = ((0, 0, 0), (3, -17, 29), (-4, 29, -29), (179, 255, -255))
    references = [hsv_jitter_opencv(probe, gains) for gains in gain_sets]
    for vector_pixels in (64, 32, 16, 8, 4, 2, 1):
        if all(np.array_equal(module.hsv_jitter(probe, *gains, vector_pixels), ref)
               for gains, ref in zip(gain_sets, references, strict=True)):
            return functools.partial(_native_hsv, module.hsv_jitter, vector_pixels)
    log.warning("HSV jitter kernel does not reproduce OpenCV %s here; augmenting with OpenCV "
                "calls (same pixels, ~3x the time)", cv2.__version__)
    return None


def _native_hsv(kernel: Callable[..., np.ndarray], vector_pixels: int, img: np.ndarray,
                dh: int, ds: int, dv: int) -> np.ndarray:
    return kernel(img, dh, ds, dv, vector_pixels)


def _colour_probe() -> np.ndarray:
    """Every colour on a grid of step 3 per channel (86^3) and 2^18 random ones, BGR uint8, in
    rows of 127 pixels: each candidate vector width leaves a different tail in every row."""
    levels = np.arange(0, 256, 3, dtype=np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    rand = np.random.default_rng(0).integers(0, 256, (1 << 18, 3), dtype=np.uint8)
    colours = np.concatenate([grid, rand])
    width = 127
    return colours[: len(colours) // width * width].reshape(-1, width, 3)


def box_candidates(
    before: np.ndarray,
    after: np.ndarray,
    wh_thr: float = 2.0,
    ar_thr: float = 20.0,
    area_thr: float = 0.2,
) -> np.ndarray:
    """Keep boxes ([N, 4] xyxy) still big enough, not too thin, and not mostly cut away."""
    w1, h1 = before[:, 2] - before[:, 0], before[:, 3] - before[:, 1]
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    ar = np.maximum(w2 / (h2 + 1e-16), h2 / (w2 + 1e-16))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + 1e-16) > area_thr) & (ar < ar_thr)


def random_flip(
    img: np.ndarray, boxes: np.ndarray, prob: float = 0.5, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip with probability ``prob``; boxes are mirrored with the pixels."""
    if _rng(rng).random() >= prob:
        return img, boxes
    width = img.shape[1]
    boxes = boxes.copy()
    x1 = boxes[:, 0].copy()
    boxes[:, 0] = width - boxes[:, 2]
    boxes[:, 2] = width - x1
    return cv2.flip(img, 1), boxes


def affine_matrix(
    src_hw: Sequence[int],
    out_hw: Sequence[int],
    degrees: Range = 10.0,
    translate: Range = 0.1,
    scale: Range = (0.5, 1.5),
    shear: Range = 2.0,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, float]:
    """Random 2x3 affine: centre the source, rotate+scale, shear, move to the output centre ± shift.

    Returns the matrix and the scale factor drawn (used to judge how much of a box survived).
    """
    rng = _rng(rng)
    center = np.eye(3)
    center[0, 2], center[1, 2] = -src_hw[1] / 2, -src_hw[0] / 2
    angle = _uniform(rng, degrees)
    s = _uniform(rng, scale, center=1.0)
    if s <= 0:
        raise ValueError(f"affine scale must be positive, drew {s} from {scale!r}")
    rot = np.eye(3)
    rot[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=angle, scale=s)
    sh = np.eye(3)
    sh[0, 1] = math.tan(math.radians(_uniform(rng, shear)))
    sh[1, 0] = math.tan(math.radians(_uniform(rng, shear)))
    move = np.eye(3)
    move[0, 2] = (0.5 + _uniform(rng, translate)) * out_hw[1]
    move[1, 2] = (0.5 + _uniform(rng, translate)) * out_hw[0]
    m = move @ sh @ rot @ center  # applied right to left
    return m[:2], s


def warp_boxes(boxes_xyxy: np.ndarray, m: np.ndarray, out_hw: Sequence[int]) -> np.ndarray:
    """Axis-aligned hull of the 4 warped corners of each box, clipped to the output."""
    n = len(boxes_xyxy)
    if n == 0:
        return boxes_xyxy.reshape(0, 4).copy()
    corners = np.ones((n * 4, 3))
    # (x1,y1) (x2,y2) (x1,y2) (x2,y1) of every box
    corners[:, :2] = boxes_xyxy[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(n * 4, 2)
    warped = (corners @ m.T).reshape(n, 8)
    xs, ys = warped[:, 0::2], warped[:, 1::2]
    out = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, out_hw[1])
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, out_hw[0])
    return out


def random_affine(
    img: np.ndarray,
    boxes: np.ndarray,
    out_hw: Sequence[int],
    degrees: Range = 10.0,
    translate: Range = 0.1,
    scale: Range = (0.5, 1.5),
    shear: Range = 2.0,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Warp ``img`` into an ``out_hw`` canvas (pad 114) and move/clip/filter the boxes with it."""
    m, s = affine_matrix(img.shape[:2], out_hw, degrees, translate, scale, shear, rng)
    return warp_affine(img, boxes, m, s, out_hw)


def warp_affine(
    img: np.ndarray, boxes: np.ndarray, m: np.ndarray, scale: float, out_hw: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """``img`` warped by the 2x3 ``m`` into an ``out_hw`` canvas (pad 114); boxes moved,
    clipped, and dropped where too little of them survives (``scale``: the one ``m`` holds)."""
    out = cv2.warpAffine(
        img, m, dsize=(int(out_hw[1]), int(out_hw[0])), borderValue=(PAD_VALUE,) * 3
    )
    if len(boxes) == 0:
        return out, boxes.reshape(0, 5).astype(np.float32)
    warped = warp_boxes(boxes[:, :4], m, out_hw)
    keep = box_candidates(boxes[:, :4] * scale, warped)
    result = np.concatenate([warped[keep], boxes[keep, 4:5]], axis=1).astype(np.float32)
    return out, result


def source_window(
    m: np.ndarray, out_hw: Sequence[int], src_hw: Sequence[int], margin: int = 2
) -> tuple[int, int, int, int]:
    """``(x1, y1, x2, y2)``: the part of a ``src_hw`` image that ``cv2.warpAffine`` with ``m``
    into ``out_hw`` reads — the bounding box of the output corners mapped back, widened by
    ``margin`` pixels for the bilinear neighbours and fixed-point rounding, clipped."""
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    corners = np.array([[0, 0, 1], [out_w - 1, 0, 1], [0, out_h - 1, 1],
                        [out_w - 1, out_h - 1, 1]], dtype=np.float64)
    back = corners @ cv2.invertAffineTransform(m).T
    src_h, src_w = int(src_hw[0]), int(src_hw[1])
    x1 = int(np.clip(math.floor(back[:, 0].min()) - margin, 0, src_w))
    y1 = int(np.clip(math.floor(back[:, 1].min()) - margin, 0, src_h))
    x2 = int(np.clip(math.ceil(back[:, 0].max()) + margin + 1, x1, src_w))
    y2 = int(np.clip(math.ceil(back[:, 1].max()) + margin + 1, y1, src_h))
    return x1, y1, x2, y2


def mixup(
    img: np.ndarray,
    boxes: np.ndarray,
    cp_img: np.ndarray,
    cp_boxes: np.ndarray,
    input_hw: Sequence[int],
    mixup_scale: Sequence[float] = (0.5, 1.5),
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """YOLOX mixup: letterbox ``cp_img`` to ``input_hw``, jitter its scale, maybe flip it, crop a
    window the size of ``img`` at a random offset and blend 50/50; its surviving boxes are added.
    """
    rng = _rng(rng)
    jitter = float(rng.uniform(mixup_scale[0], mixup_scale[1]))
    flip = rng.uniform(0, 1) > 0.5
    in_h, in_w = int(input_hw[0]), int(input_hw[1])

    ratio = min(in_h / cp_img.shape[0], in_w / cp_img.shape[1])
    canvas = np.full((in_h, in_w, 3), PAD_VALUE, dtype=np.uint8)
    rh, rw = int(cp_img.shape[0] * ratio), int(cp_img.shape[1] * ratio)
    canvas[:rh, :rw] = cv2.resize(cp_img, (rw, rh), interpolation=cv2.INTER_LINEAR)
    canvas = cv2.resize(canvas, (max(1, int(in_w * jitter)), max(1, int(in_h * jitter))))
    ratio *= jitter
    if flip:
        canvas = canvas[:, ::-1]

    src_h, src_w = canvas.shape[:2]
    dst_h, dst_w = img.shape[:2]
    padded = np.zeros((max(src_h, dst_h), max(src_w, dst_w), 3), dtype=np.uint8)
    padded[:src_h, :src_w] = canvas
    y_off = int(rng.integers(0, padded.shape[0] - dst_h)) if padded.shape[0] > dst_h else 0
    x_off = int(rng.integers(0, padded.shape[1] - dst_w)) if padded.shape[1] > dst_w else 0
    window = padded[y_off : y_off + dst_h, x_off : x_off + dst_w]

    scaled = cp_boxes[:, :4].astype(np.float64) * ratio
    scaled[:, 0::2] = scaled[:, 0::2].clip(0, src_w)
    scaled[:, 1::2] = scaled[:, 1::2].clip(0, src_h)
    if flip:
        scaled[:, [0, 2]] = src_w - scaled[:, [2, 0]]
    moved = scaled.copy()
    moved[:, 0::2] = (moved[:, 0::2] - x_off).clip(0, dst_w)
    moved[:, 1::2] = (moved[:, 1::2] - y_off).clip(0, dst_h)
    keep = box_candidates(scaled, moved, wh_thr=5)
    if not keep.any():  # nothing of the pasted image would be labelled: leave img untouched
        return img, boxes
    added = np.concatenate([moved[keep], cp_boxes[keep, 4:5]], axis=1).astype(np.float32)
    blended = cv2.addWeighted(np.ascontiguousarray(img), 0.5, np.ascontiguousarray(window), 0.5, 0)
    return blended, np.concatenate([boxes.reshape(-1, 5).astype(np.float32), added], axis=0)


class TrainTransform:
    """Last training step: HSV jitter, flip, letterbox, boxes -> fixed ``[max_labels, 5]`` targets
    ``(class, cx, cy, w, h)`` in input pixels, zero padded. Returns ``(hwc_uint8, targets)``:
    the image stays 8-bit BGR until the training process makes it the network's float input
    (:func:`accelcore.data.loader.network_input`), so loader workers move a quarter of the bytes.
    """

    def __init__(self, max_labels: int = 50, flip_prob: float = 0.5, hsv_prob: float = 1.0):
        self.max_labels = int(max_labels)
        self.flip_prob = float(flip_prob)
        self.hsv_prob = float(hsv_prob)
        if self.hsv_prob > 0:
            hsv_kernel()  # built and checked here, before loader workers fork

    def _pack(self, labels: np.ndarray, boxes_cxcywh: np.ndarray) -> np.ndarray:
        targets = np.zeros((self.max_labels, 5), dtype=np.float32)
        n = min(len(labels), self.max_labels)
        targets[:n, 0] = labels[:n]
        targets[:n, 1:] = boxes_cxcywh[:n]
        return targets

    def __call__(
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        input_hw: Sequence[int],
        rng: np.random.Generator | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        rng = _rng(rng)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
        if len(boxes) == 0:
            canvas, _ = letterbox_hwc(image, input_hw)
            return canvas, np.zeros((self.max_labels, 5), dtype=np.float32)

        original = image
        image = np.ascontiguousarray(image)
        if rng.random() < self.hsv_prob:
            image = augment_hsv(image, rng=rng)
        image, flipped = random_flip(image, boxes, self.flip_prob, rng)
        canvas, ratio = letterbox_hwc(image, input_hw)
        cxcywh = xyxy_to_cxcywh(flipped[:, :4]) * ratio
        keep = np.minimum(cxcywh[:, 2], cxcywh[:, 3]) > 1
        if not keep.any():
            # Every box became sub-pixel: fall back to the un-augmented image and all its boxes,
            # as YOLOX does, rather than train on a labelled image with no labels.
            canvas, ratio = letterbox_hwc(original, input_hw)
            return canvas, self._pack(boxes[:, 4], xyxy_to_cxcywh(boxes[:, :4]) * ratio)
        return canvas, self._pack(flipped[keep, 4], cxcywh[keep])
