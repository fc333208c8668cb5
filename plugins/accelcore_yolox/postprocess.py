"""Decoding of raw head output and NMS post-processing (both in fp32, outside the model graph).

The raw output of :class:`~accelcore_yolox.models.head.YOLOXHead` is ``[B, N, 5 + C]`` =
(dx, dy, log w, log h, obj logit, cls logits). Decoding turns it into official YOLOX eval output
(cx, cy, w, h in input pixels, sigmoid obj, sigmoid cls). Keeping it out of the module means
int8 backends never quantize the exp/sigmoid and the core can decode backend output the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import cv2
import numpy as np
import torch

DEFAULT_STRIDES: tuple[int, ...] = (8, 16, 32)

# Above this many candidates in one image, class-aware NMS runs one cv2.dnn.NMSBoxes per class:
# OpenCV's NMS compares every candidate with every kept box, so the class-offset trick of
# NMSBoxesBatched costs O(N * kept) across classes, ~5x slower at a few thousand candidates.
# Both give the same kept set.
_BATCHED_NMS_MAX = 1000


def level_shapes(
    input_hw: Sequence[int], strides: Sequence[int] = DEFAULT_STRIDES
) -> list[tuple[int, int]]:
    """Feature-map (h, w) per stride for an input of ``input_hw``.

    The Focus stem halves exactly and every stride-2 3x3 conv (padding 1) rounds up, so a
    stride-s map has ceil(H / s) rows.
    """
    h, w = int(input_hw[0]), int(input_hw[1])
    return [(-(-h // s), -(-w // s)) for s in strides]


@functools.lru_cache(maxsize=32)
def _grids_cpu(h: int, w: int, strides: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    grids, strides_out = [], []
    for (fh, fw), s in zip(level_shapes((h, w), strides), strides, strict=True):
        ys, xs = torch.meshgrid(torch.arange(fh), torch.arange(fw), indexing="ij")
        grids.append(torch.stack((xs, ys), dim=-1).reshape(-1, 2))
        strides_out.append(torch.full((fh * fw, 1), s))
    return torch.cat(grids).float(), torch.cat(strides_out).float()


def make_grids(
    input_hw: Sequence[int],
    strides: Sequence[int] = DEFAULT_STRIDES,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor-point grid ``[N, 2]`` (x, y cell index) and stride ``[N, 1]``, float32.

    Cached (the training loop asks for the same grid every step); callers must not modify the
    returned tensors in place.
    """
    grid, stride = _grids_cpu(int(input_hw[0]), int(input_hw[1]), tuple(int(s) for s in strides))
    if device is not None and torch.device(device).type != "cpu":
        grid, stride = grid.to(device), stride.to(device)
    return grid, stride


def decode_boxes(reg: torch.Tensor, grid: torch.Tensor, stride: torch.Tensor) -> torch.Tensor:
    """Raw (dx, dy, log w, log h) -> (cx, cy, w, h) in input pixels (differentiable)."""
    return torch.cat(((reg[..., :2] + grid) * stride, torch.exp(reg[..., 2:4]) * stride), dim=-1)


def decode_outputs(
    raw: torch.Tensor, input_hw: Sequence[int], strides: Sequence[int] = DEFAULT_STRIDES
) -> torch.Tensor:
    """Raw head output -> official YOLOX eval output ``[B, N, 5 + C]``, always float32."""
    raw = raw.float()
    grid, stride = make_grids(input_hw, strides, raw.device)
    if raw.shape[-2] != grid.shape[0]:
        raise ValueError(
            f"raw output has {raw.shape[-2]} anchors but input size {tuple(input_hw)} with "
            f"strides {tuple(strides)} gives {grid.shape[0]}; pass the network input (H, W)"
        )
    return torch.cat((decode_boxes(raw[..., :4], grid, stride), raw[..., 4:].sigmoid()), dim=-1)


def _nms_per_class(
    boxes_xywh: np.ndarray, scores: np.ndarray, classes: np.ndarray, thr: float
) -> np.ndarray:
    order = np.argsort(classes, kind="stable")
    bounds = np.flatnonzero(np.diff(classes[order])) + 1
    kept = []
    for group in np.split(order, bounds):
        picked = cv2.dnn.NMSBoxes(boxes_xywh[group], scores[group], 0.0, thr)
        kept.append(group[np.asarray(picked, dtype=np.int64).reshape(-1)])
    keep = np.concatenate(kept)
    return keep[np.argsort(-scores[keep], kind="stable")]


def nms(
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray | None,
    nms_thre: float,
) -> np.ndarray:
    """Indices kept by NMS, highest score first; class-aware when ``classes`` is given."""
    if len(scores) == 0:
        return np.zeros(0, dtype=np.int64)
    xywh = np.empty_like(boxes_xyxy, dtype=np.float64)
    xywh[:, :2] = boxes_xyxy[:, :2]
    xywh[:, 2:] = boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    # Score threshold 0: the caller has already applied conf_thre (OpenCV rejects negatives).
    if classes is None:
        picked = cv2.dnn.NMSBoxes(xywh, scores, 0.0, float(nms_thre))
    elif len(scores) <= _BATCHED_NMS_MAX:
        picked = cv2.dnn.NMSBoxesBatched(
            xywh, scores, np.ascontiguousarray(classes, dtype=np.int32), 0.0, float(nms_thre)
        )
    else:
        return _nms_per_class(xywh, scores, np.asarray(classes, dtype=np.int32), float(nms_thre))
    return np.asarray(picked, dtype=np.int64).reshape(-1)


def postprocess(
    decoded: torch.Tensor | np.ndarray,
    conf_thre: float = 0.001,
    nms_thre: float = 0.65,
    class_agnostic: bool = False,
    max_det: int = 300,
    max_candidates: int = 30000,
) -> list[np.ndarray]:
    """Decoded output ``[B, N, 5 + C]`` -> per image float32 ``(K, 6)`` arrays
    (x1, y1, x2, y2, score, class_index) in network-input pixels, best score first.

    score = obj x best class probability (as official); candidates below ``conf_thre`` are
    dropped before NMS, at most ``max_candidates`` (highest scores) enter NMS and at most
    ``max_det`` survive (``max_det <= 0`` keeps all).
    """
    pred = torch.as_tensor(decoded).detach().float().cpu()
    if pred.ndim != 3 or pred.shape[-1] < 6:
        raise ValueError(f"expected decoded output [B, N, 5 + C], got shape {tuple(pred.shape)}")
    cls_conf, cls_idx = pred[..., 5:].max(dim=-1)
    scores = (pred[..., 4] * cls_conf).numpy()
    boxes = _xyxy(pred[..., :4]).numpy()
    classes = cls_idx.to(torch.int32).numpy()
    per_image = []
    for b in range(pred.shape[0]):
        idx = np.flatnonzero(scores[b] >= conf_thre)
        per_image.append((boxes[b, idx], scores[b, idx], classes[b, idx]))
    return _select(per_image, nms_thre, class_agnostic, max_det, max_candidates)


def postprocess_raw(
    raw: torch.Tensor | np.ndarray,
    input_hw: Sequence[int],
    strides: Sequence[int] = DEFAULT_STRIDES,
    conf_thre: float = 0.001,
    nms_thre: float = 0.65,
    class_agnostic: bool = False,
    max_det: int = 300,
    max_candidates: int = 30000,
) -> list[np.ndarray]:
    """``postprocess(decode_outputs(raw, input_hw, strides), …)`` computed for the candidates
    only: the same detections (to float rounding of the sigmoid), several times faster.

    A box's score is sigmoid(obj) x the best class probability, and that probability is at most
    1, so an anchor whose objectness alone is below ``conf_thre`` can never pass: only anchors
    that pass are decoded, and their best class is found on the logits (sigmoid is monotonic, so
    the best logit is the best probability). Decoding every anchor of a 416 px batch of 64 —
    a sigmoid over 18 M class logits — was most of the streaming predictor's post-processing.
    """
    raw = torch.as_tensor(raw).detach().cpu().float()
    grid, stride = make_grids(input_hw, strides)
    if raw.ndim != 3 or raw.shape[-1] < 6 or raw.shape[-2] != grid.shape[0]:
        raise ValueError(
            f"raw output has shape {tuple(raw.shape)}; input size {tuple(input_hw)} with "
            f"strides {tuple(strides)} needs [B, {grid.shape[0]}, 5 + C]"
        )
    obj = raw[..., 4].sigmoid()
    image_idx, anchor_idx = (obj >= conf_thre).nonzero(as_tuple=True)  # row-major: by image
    rows = raw[image_idx, anchor_idx]
    best_logit, best_class = rows[:, 5:].max(dim=-1)
    scores = obj[image_idx, anchor_idx] * best_logit.sigmoid()
    passed = scores >= conf_thre
    image_idx, anchor_idx = image_idx[passed], anchor_idx[passed]
    boxes = _xyxy(decode_boxes(rows[passed, :4], grid[anchor_idx], stride[anchor_idx])).numpy()
    scores = scores[passed].numpy()
    classes = best_class[passed].to(torch.int32).numpy()
    bounds = np.searchsorted(image_idx.numpy(), np.arange(raw.shape[0] + 1))
    per_image = [(boxes[lo:hi], scores[lo:hi], classes[lo:hi])
                 for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    return _select(per_image, nms_thre, class_agnostic, max_det, max_candidates)


def _xyxy(cxcywh: torch.Tensor) -> torch.Tensor:
    half = cxcywh[..., 2:4] / 2
    return torch.cat((cxcywh[..., :2] - half, cxcywh[..., :2] + half), dim=-1)


def _select(
    per_image: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    nms_thre: float,
    class_agnostic: bool,
    max_det: int,
    max_candidates: int,
) -> list[np.ndarray]:
    """Per image (boxes xyxy, scores, classes) of the candidates above the score threshold, in
    anchor order -> its ``(K, 6)`` detections: the ``max_candidates`` best enter NMS, at most
    ``max_det`` survive, best score first."""
    results = []
    for boxes, scores, classes in per_image:
        idx = np.arange(scores.size)
        if idx.size > max_candidates:
            idx = idx[np.argpartition(-scores, max_candidates - 1)[:max_candidates]]
        kept = nms(boxes[idx], scores[idx], None if class_agnostic else classes[idx], nms_thre)
        if max_det > 0:
            kept = kept[:max_det]
        sel = idx[kept]
        out = np.empty((sel.size, 6), dtype=np.float32)
        out[:, :4] = boxes[sel]
        out[:, 4] = scores[sel]
        out[:, 5] = classes[sel]
        results.append(out)
    return results
