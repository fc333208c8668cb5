"""YOLOX post-processing: score = obj x cls, conf filter, class-aware NMS, output layout."""

from __future__ import annotations

import time

import accelcore_yolox.postprocess as pp
import numpy as np
import pytest
import torch

from accelcore import registry


def _decoded(rows, num_classes=3):
    """rows: (x1, y1, x2, y2, obj, class, class_prob) -> decoded [1, N, 5 + C] (cxcywh)."""
    out = torch.zeros(1, len(rows), 5 + num_classes)
    for i, (x1, y1, x2, y2, obj, cls, prob) in enumerate(rows):
        out[0, i, :4] = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        out[0, i, 4] = obj
        out[0, i, 5 + cls] = prob
    return out


ROWS = [
    (10, 10, 50, 50, 0.9, 0, 1.0),  # kept (best of its cluster)
    (12, 12, 52, 52, 0.8, 0, 1.0),  # IoU ~0.82 with row 0, same class -> suppressed
    (12, 12, 52, 52, 0.7, 1, 1.0),  # same place, other class -> kept (class-aware)
    (100, 100, 140, 150, 0.5, 2, 0.8),  # far away -> kept, score 0.4
    (200, 200, 220, 220, 0.1, 2, 0.05),  # score 0.005 < conf 0.01 -> dropped
]


def test_class_aware_nms():
    (det,) = pp.postprocess(_decoded(ROWS), conf_thre=0.01, nms_thre=0.5)
    assert det.dtype == np.float32 and det.shape == (3, 6)
    np.testing.assert_allclose(det[:, 4], [0.9, 0.7, 0.4], rtol=1e-6)  # best first
    np.testing.assert_array_equal(det[:, 5], [0, 1, 2])
    np.testing.assert_allclose(det[0, :4], [10, 10, 50, 50])
    np.testing.assert_allclose(det[2, :4], [100, 100, 140, 150])


def test_class_agnostic_and_thresholds():
    (det,) = pp.postprocess(_decoded(ROWS), conf_thre=0.01, nms_thre=0.5, class_agnostic=True)
    np.testing.assert_allclose(det[:, 4], [0.9, 0.4], rtol=1e-6)
    # conf threshold is inclusive (score >= conf_thre, as official)
    (det,) = pp.postprocess(_decoded(ROWS), conf_thre=0.4, nms_thre=0.5)
    np.testing.assert_allclose(det[:, 4], [0.9, 0.7, 0.4], rtol=1e-6)
    # a loose NMS threshold keeps the overlapping same-class box
    (det,) = pp.postprocess(_decoded(ROWS), conf_thre=0.01, nms_thre=0.9)
    assert len(det) == 4
    # max_det caps, keeping the best
    (det,) = pp.postprocess(_decoded(ROWS), conf_thre=0.01, nms_thre=0.5, max_det=2)
    np.testing.assert_allclose(det[:, 4], [0.9, 0.7], rtol=1e-6)


def test_empty_and_batch():
    decoded = torch.cat((_decoded(ROWS), torch.zeros(1, len(ROWS), 8)))
    out = pp.postprocess(decoded, conf_thre=0.01, nms_thre=0.5)
    assert len(out) == 2 and out[1].shape == (0, 6) and out[1].dtype == np.float32
    with pytest.raises(ValueError, match="decoded"):
        pp.postprocess(torch.zeros(4, 85))


def test_per_class_path_equals_batched_opencv():
    # Above _BATCHED_NMS_MAX candidates the per-class path is used; both must agree.
    rng = np.random.default_rng(0)
    n = 600
    xy = rng.uniform(0, 300, (n, 2))
    wh = rng.uniform(10, 80, (n, 2))
    boxes = np.concatenate((xy, xy + wh), 1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    classes = rng.integers(0, 5, n).astype(np.int32)
    xywh = np.concatenate((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), 1).astype(np.float64)
    a = pp._nms_per_class(xywh, scores, classes, 0.5)
    b = pp.nms(boxes, scores, classes, 0.5)  # n <= threshold -> cv2.dnn.NMSBoxesBatched
    np.testing.assert_array_equal(a, b)
    assert 0 < len(a) < n


def test_model_postprocess_fast_on_nano_sized_batch():
    model = registry.create_model("yolox_nano", num_classes=80)
    gen = torch.Generator().manual_seed(0)
    decoded = torch.rand(64, 3549, 85, generator=gen)
    decoded[..., :2] *= 416
    decoded[..., 2:4] = decoded[..., 2:4] * 60 + 4
    decoded[..., 4] = decoded[..., 4] ** 4  # most anchors low objectness, like a trained model
    t0 = time.perf_counter()
    out = model.postprocess(decoded, conf_thre=0.001, nms_thre=0.65)
    elapsed = time.perf_counter() - t0
    assert len(out) == 64 and all(o.shape[1] == 6 and len(o) <= 300 for o in out)
    assert all((o[:, 4] >= 0.001).all() and (np.diff(o[:, 4]) <= 0).all() for o in out)
    # generous bound for a shared 2-core machine (typically well under 1 s)
    assert elapsed < 10, elapsed


def _raw_batch(batch: int, size: int, num_classes: int, seed: int) -> torch.Tensor:
    """A raw head output for ``size`` px: most anchors with low objectness, like a trained
    model, a few confident ones, and class logits spread out."""
    anchors = pp.make_grids((size, size))[0].shape[0]
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(batch, anchors, 5 + num_classes, generator=gen)
    raw[..., 4] = raw[..., 4] * 3 - 6
    raw[..., 5:] *= 4
    return raw


@pytest.mark.parametrize(("conf", "nms_thre", "agnostic", "max_det"),
                         [(0.001, 0.65, False, 300), (0.3, 0.45, False, 300),
                          (0.05, 0.5, True, 300), (0.01, 0.65, False, 5), (0.999, 0.5, False, 0)])
def test_postprocess_raw_equals_decode_then_postprocess(conf, nms_thre, agnostic, max_det):
    raw = _raw_batch(6, 160, 7, seed=int(conf * 1000))
    raw[3, :, 4] = -30  # one image with no candidate at all
    full = pp.postprocess(pp.decode_outputs(raw, (160, 160)), conf, nms_thre,
                          class_agnostic=agnostic, max_det=max_det)
    fast = pp.postprocess_raw(raw, (160, 160), conf_thre=conf, nms_thre=nms_thre,
                              class_agnostic=agnostic, max_det=max_det)
    assert len(fast) == len(full) == 6
    assert len(fast[3]) == 0
    assert sum(len(d) for d in full) > 0 or conf > 0.9
    for a, b in zip(full, fast, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a[:, 5], b[:, 5])
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-4)


def test_postprocess_raw_rejects_a_mismatched_input_size():
    raw = _raw_batch(1, 160, 3, seed=0)
    with pytest.raises(ValueError, match=r"input size \(192, 192\)"):
        pp.postprocess_raw(raw, (192, 192))


def test_predictor_uses_the_models_fused_path():
    from accelcore.predictor import Predictor

    model = registry.create_model("yolox_nano", num_classes=4).eval()
    model.output_mode = "raw"
    raw = _raw_batch(2, 160, 4, seed=1)
    predictor = Predictor(lambda x: raw, model, raw=True, conf_thre=0.01, nms_thre=0.65)
    got = predictor.detections(raw, (160, 160))
    want = model.postprocess(model.decode(raw, (160, 160)), 0.01, 0.65)
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-4)
    calls = []
    model.postprocess_raw = lambda *args: calls.append(args) or []
    predictor.detections(raw, (160, 160))
    assert len(calls) == 1 and calls[0][1:] == ((160, 160), 0.01, 0.65)
