"""Augmentation geometry: after every operation the boxes must follow the pixels.

Source images are black with pure-colour rectangles (class k = BGR channel k at 255); the pad
colour is grey 114, so a pixel belongs to class k exactly when channel k is high and the other
two are low. Each test checks that every (big enough) output box is tight around its class's
pixels and that the class pixels are covered by boxes.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from accelcore.data import augment
from accelcore.data.augment import (
    TrainTransform,
    affine_matrix,
    augment_hsv,
    cxcywh_to_xyxy,
    hsv_jitter_opencv,
    mixup,
    random_affine,
    random_flip,
    source_window,
    warp_affine,
)
from accelcore.data.mosaic import MosaicDetection, build_mosaic
from accelcore.data.multiscale import multiscale_size, resize_batch

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def make_image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Black image with one rectangle per class, non-overlapping, boxes [K,5] xyxy+cls."""
    img = np.zeros((h, w, 3), np.uint8)
    boxes: list[list[float]] = []
    for cls in range(3):
        for _ in range(100):
            bw, bh = int(rng.integers(w // 6, w // 3)), int(rng.integers(h // 6, h // 3))
            x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            cand = [x1, y1, x1 + bw, y1 + bh]
            if all(
                cand[2] <= b[0] or b[2] <= cand[0] or cand[3] <= b[1] or b[3] <= cand[1]
                for b in boxes
            ):
                break
        else:
            continue
        img[cand[1] : cand[3], cand[0] : cand[2]] = COLOURS[cls]
        boxes.append([*cand, cls])
    return img, np.array(boxes, np.float32).reshape(-1, 5)


def class_mask(img: np.ndarray, cls: int) -> np.ndarray:
    img = img.astype(np.int16)
    others = [c for c in range(3) if c != cls]
    return (img[..., cls] >= 160) & (img[..., others[0]] <= 90) & (img[..., others[1]] <= 90)


def check_boxes_follow_pixels(
    img: np.ndarray, boxes: np.ndarray, min_side: float = 12, min_iou: float = 0.8,
    min_coverage: float = 0.97, mask_fn=class_mask,
) -> int:
    """Assert tightness of each big box and coverage of class pixels; returns boxes checked."""
    h, w = img.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    checked = 0
    for cls in range(3):
        mask = mask_fn(img, cls)
        cls_boxes = boxes[boxes[:, 4] == cls]
        covered = np.zeros_like(mask)
        for x1, y1, x2, y2, _ in cls_boxes:
            assert 0 <= x1 <= x2 <= w + 1e-3 and 0 <= y1 <= y2 <= h + 1e-3, (x1, y1, x2, y2)
            inside = (xs >= x1 - 2) & (xs < x2 + 2) & (ys >= y1 - 2) & (ys < y2 + 2)
            covered |= inside
            if min(x2 - x1, y2 - y1) < min_side:
                continue
            sel = mask & inside
            assert sel.sum() > 0, f"class {cls} box {x1, y1, x2, y2} holds no class pixels"
            py, px = np.nonzero(sel)
            pix = np.array([px.min(), py.min(), px.max() + 1, py.max() + 1], np.float64)
            ix = max(0.0, min(pix[2], x2) - max(pix[0], x1))
            iy = max(0.0, min(pix[3], y2) - max(pix[1], y1))
            inter = ix * iy
            union = (pix[2] - pix[0]) * (pix[3] - pix[1]) + (x2 - x1) * (y2 - y1) - inter
            assert inter / union >= min_iou, (
                f"class {cls}: box {np.round([x1, y1, x2, y2], 1)} vs pixels {pix} "
                f"IoU {inter / union:.2f}"
            )
            checked += 1
        if mask.sum() > 50:
            frac = (mask & covered).sum() / mask.sum()
            assert frac >= min_coverage, f"class {cls}: only {frac:.2%} of its pixels in a box"
    return checked


def test_flip_moves_boxes_with_pixels() -> None:
    rng = np.random.default_rng(0)
    img, boxes = make_image(rng, 120, 200)
    out, fboxes = random_flip(img, boxes, prob=1.0, rng=rng)
    assert not np.array_equal(out, img)
    check_boxes_follow_pixels(out, fboxes)
    same, sboxes = random_flip(img, boxes, prob=0.0, rng=rng)
    assert same is img and np.array_equal(sboxes, boxes)


@pytest.mark.parametrize("seed", range(6))
def test_random_affine_boxes_follow_pixels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    img, boxes = make_image(rng, 240, 320)
    out, warped = random_affine(
        img, boxes, (256, 288), degrees=25, translate=0.1, scale=(0.6, 1.2), shear=8, rng=rng
    )
    assert out.shape == (256, 288, 3)
    assert len(warped) >= 1
    assert check_boxes_follow_pixels(out, warped, min_coverage=0.9) >= 1


def test_affine_identity_keeps_exact_boxes() -> None:
    rng = np.random.default_rng(1)
    img, boxes = make_image(rng, 100, 100)
    out, warped = random_affine(img, boxes, (100, 100), 0.0, 0.0, (1.0, 1.0), 0.0, rng=rng)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_allclose(warped, boxes, atol=1e-4)


def test_build_mosaic_tiles_and_boxes() -> None:
    rng = np.random.default_rng(2)
    items = [make_image(rng, h, w) for h, w in [(90, 160), (200, 120), (64, 64), (150, 300)]]
    for xc, yc in [(100, 80), (60, 150), (150, 100)]:
        canvas, boxes = build_mosaic(items, (100, 100), xc, yc)
        assert canvas.shape == (200, 200, 3)
        # Mosaic placement only scales and shifts: boxes must match pixels tightly.
        check_boxes_follow_pixels(canvas, boxes[(boxes[:, 2] > boxes[:, 0])], min_iou=0.85)


class TinyDataset:
    """Images of various sizes made by make_image, in the COCODataset item format."""

    def __init__(self, n: int = 6, seed: int = 0, empty: bool = False) -> None:
        rng = np.random.default_rng(seed)
        sizes = [(int(rng.integers(80, 260)), int(rng.integers(80, 260))) for _ in range(n)]
        self.items = [make_image(rng, h, w) for h, w in sizes]
        if empty:
            self.items = [(img * 0, np.zeros((0, 5), np.float32)) for img, _ in self.items]
        self.class_names = ["b", "g", "r"]
        self.num_classes = 3

    def __len__(self) -> int:
        return len(self.items)

    def pull_item(self, i: int):
        img, boxes = self.items[i]
        return img.copy(), boxes.copy(), img.shape[:2], i + 100


def targets_to_xyxy(targets: np.ndarray) -> np.ndarray:
    rows = targets[targets[:, 3] * targets[:, 4] > 0]
    out = np.zeros((len(rows), 5), np.float32)
    out[:, :4] = cxcywh_to_xyxy(rows[:, 1:5])
    out[:, 4] = rows[:, 0]
    return out


def test_train_transform_letterbox_and_targets() -> None:
    rng = np.random.default_rng(3)
    img, boxes = make_image(rng, 150, 300)
    tt = TrainTransform(max_labels=7, flip_prob=0.5, hsv_prob=0.0)
    flipped_seen = set()
    for seed in range(6):
        hwc, targets = tt(img.copy(), boxes, (128, 160), np.random.default_rng(seed))
        assert hwc.shape == (128, 160, 3) and hwc.dtype == np.uint8
        assert targets.shape == (7, 5) and targets.dtype == np.float32
        assert np.all(targets[len(boxes) :] == 0)
        assert np.all(hwc[81:, :] == 114)  # 150*(160/300)=80 rows of image, then padding
        check_boxes_follow_pixels(hwc, targets_to_xyxy(targets), min_side=6, min_iou=0.75)
        unflipped_cx = (boxes[0, 0] + boxes[0, 2]) / 2 * 160 / 300
        flipped_seen.add(bool(abs(targets[0, 1] - unflipped_cx) > 1))
    assert flipped_seen == {True, False}


def test_train_transform_empty_and_tiny() -> None:
    tt = TrainTransform(max_labels=5, flip_prob=0.5, hsv_prob=1.0)
    img = np.full((50, 60, 3), 30, np.uint8)
    hwc, targets = tt(img, np.zeros((0, 5), np.float32), (64, 64))
    assert hwc.shape == (64, 64, 3) and not targets.any()
    # Only a sub-pixel box after resize: falls back to the unaugmented image with its boxes.
    big = np.zeros((1000, 1000, 3), np.uint8)
    tiny = np.array([[10, 10, 11, 11, 2]], np.float32)
    _, targets = tt(big, tiny, (64, 64), np.random.default_rng(0))
    assert targets[0, 0] == 2 and targets[0, 3] > 0


@pytest.mark.parametrize("seed", range(8))
def test_mosaic_detection_pipeline_geometry(seed: int) -> None:
    ds = TinyDataset(6, seed=seed)
    wrap = MosaicDetection(
        ds, (160, 192), mosaic_prob=1.0, hsv_prob=0.0, flip_prob=0.5, degrees=10,
        translate=0.1, mosaic_scale=(0.5, 1.5), shear=2.0, enable_mixup=False, max_labels=40,
    )
    hwc, targets, size, img_id = wrap[(seed % 6, 1000 + seed)]
    assert hwc.shape == (160, 192, 3) and targets.shape == (40, 5) and size == (160, 192)
    assert img_id == 100 + seed % 6
    boxes = targets_to_xyxy(targets)
    check_boxes_follow_pixels(hwc, boxes, min_iou=0.7, min_coverage=0.85)
    # Same seed -> same sample; the training loader relies on it.
    hwc2, targets2, _, _ = wrap[(seed % 6, 1000 + seed)]
    np.testing.assert_array_equal(hwc, hwc2)
    np.testing.assert_array_equal(targets, targets2)


def test_close_mosaic_and_key_flag() -> None:
    ds = TinyDataset(4, seed=5)
    wrap = MosaicDetection(ds, (128, 128), mosaic_prob=1.0, hsv_prob=0.0, flip_prob=0.0,
                           enable_mixup=False)
    plain = TrainTransform(wrap.preproc.max_labels, flip_prob=0.0, hsv_prob=0.0)
    expected, exp_t = plain(*ds.pull_item(1)[:2], (128, 128))
    # mosaic flag False in the key (what the loader sends after close_mosaic)
    image, t, _, _ = wrap[(1, 7, False)]
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(t, exp_t)
    mosaic, _, _, _ = wrap[(1, 7, True)]
    assert not np.array_equal(mosaic, expected)
    wrap.close_mosaic()
    image, _, _, _ = wrap[(1, 7, True)]
    np.testing.assert_array_equal(image, expected)
    assert wrap.num_classes == 3 and wrap.class_names == ["b", "g", "r"]


def red_only(img: np.ndarray, cls: int) -> np.ndarray:
    img = img.astype(np.int16)
    if cls != 2:
        return np.zeros(img.shape[:2], bool)
    return (img[..., 2] - np.maximum(img[..., 0], img[..., 1]) >= 50) & (img[..., 2] >= 100)


def test_mixup_pasted_boxes_follow_pixels() -> None:
    rng = np.random.default_rng(9)
    base = np.zeros((160, 160, 3), np.uint8)
    base[20:60, 20:70] = COLOURS[0]
    base_boxes = np.array([[20, 20, 70, 60, 0]], np.float32)
    flips = set()
    blended_runs = 0
    for seed in range(12):
        cp, cp_boxes = make_image(rng, int(rng.integers(100, 240)), int(rng.integers(100, 240)))
        cp_boxes = cp_boxes[cp_boxes[:, 4] == 2]
        cp[class_mask(cp, 0) | class_mask(cp, 1)] = 0  # keep only the red rectangle
        out, boxes = mixup(base, base_boxes, cp, cp_boxes, (160, 160), (0.5, 1.5),
                           np.random.default_rng(seed))
        assert out.shape == base.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(boxes[0], base_boxes[0])
        if len(boxes) == 1:
            assert out is base
            continue
        blended_runs += 1
        pasted = boxes[1:]
        assert np.all(pasted[:, 4] == 2)
        check_boxes_follow_pixels(out, pasted, min_side=8, min_iou=0.75, mask_fn=red_only)
        # mixup draws the scale jitter, then the flip coin: replay them to know the branch.
        flips.add(bool(np.random.default_rng(seed).uniform(size=2)[1] > 0.5))
    assert blended_runs >= 4
    assert flips == {True, False}  # both the flipped and the plain paste were checked


def test_mosaic_with_mixup_runs_and_tolerates_background_only() -> None:
    wrap = MosaicDetection(TinyDataset(4, seed=1), (96, 96), mosaic_prob=1.0, mixup_prob=1.0,
                           enable_mixup=True, mixup_scale=(0.5, 1.5))
    hwc, targets, _, _ = wrap[(0, 3)]
    assert hwc.shape == (96, 96, 3) and (targets[:, 3] > 0).any()
    empty = MosaicDetection(TinyDataset(3, empty=True), (64, 64), enable_mixup=True)
    hwc, targets, _, _ = empty[(0, 5)]  # must not loop forever looking for labels
    assert hwc.shape == (64, 64, 3) and not targets.any()


def test_hsv_changes_colour_not_geometry() -> None:
    rng = np.random.default_rng(0)
    img, _ = make_image(rng, 64, 64)
    img[img.sum(-1) == 0] = (40, 90, 160)
    changed = 0
    for seed in range(10):
        out = augment_hsv(img.copy(), rng=np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.uint8
        diff = np.abs(out.astype(int) - img.astype(int))
        changed += int(diff.max() > 0)
        assert diff.mean() < 60  # jitter, not a different image
    assert changed >= 5


def test_hsv_equals_the_int16_reference_for_every_gain_pattern() -> None:
    # YOLOX's own formulation (int16 HSV, shift, wrap/clip, back to BGR), with the same draws.
    def reference(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        gains = rng.uniform(-1, 1, 3) * np.array([5, 30, 30])
        gains = (gains * rng.integers(0, 2, 3)).astype(np.int16)
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.int16)
        hsv[..., 0] = (hsv[..., 0] + gains[0]) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] + gains[1], 0, 255)
        hsv[..., 2] = np.clip(hsv[..., 2] + gains[2], 0, 255)
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)

    img = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    patterns = set()
    for seed in range(40):
        draws = np.random.default_rng(seed)
        draws.uniform(-1, 1, 3)
        patterns.add(tuple(draws.integers(0, 2, 3)))
        out = augment_hsv(img, rng=np.random.default_rng(seed))
        assert np.array_equal(out, reference(img, np.random.default_rng(seed))), seed
    assert len(patterns) == 8  # every on/off combination of H, S, V, all-off included


def test_hsv_kernel_gives_opencvs_pixels_for_every_colour() -> None:
    kernel = augment.hsv_kernel()
    if kernel is None:
        pytest.skip("the HSV kernel cannot be built or does not reproduce this OpenCV here")
    code = np.arange(1 << 24, dtype=np.uint32)
    colours = np.stack([code >> 16, (code >> 8) & 255, code & 255], -1).astype(np.uint8)
    # Rows as wide as a training image: OpenCV's vector body and scalar row tail both occur.
    width = 416
    image = colours[: len(colours) // width * width].reshape(-1, width, 3)
    for gains in [(0, 0, 0), (4, -29, 13), (-4, 17, -29), (2, 0, 0), (0, 0, -7), (179, 255, 255)]:
        assert np.array_equal(kernel(image, *gains), hsv_jitter_opencv(image, gains)), gains
    odd = colours[::977][: 33 * 61].reshape(33, 61, 3)  # narrower than a vector: all tail
    assert np.array_equal(kernel(odd, 3, 5, -5), hsv_jitter_opencv(odd, (3, 5, -5)))


def test_hsv_kernel_is_only_used_where_it_matches_opencv(monkeypatch, caplog) -> None:
    img = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = augment_hsv(img, rng=np.random.default_rng(4))
    for how in ("switched off", "differs"):
        augment.hsv_kernel.cache_clear()
        with monkeypatch.context() as patch:
            if how == "switched off":
                patch.setenv(augment.NATIVE_HSV_ENV, "0")
            else:  # an OpenCV whose arithmetic the kernel does not reproduce
                patch.setattr(augment, "hsv_jitter_opencv",
                              lambda im, gains: hsv_jitter_opencv(im, gains) ^ 1)
            assert augment.hsv_kernel() is None
        assert np.array_equal(augment_hsv(img, rng=np.random.default_rng(4)), expected)
    assert "does not reproduce OpenCV" in caplog.text
    augment.hsv_kernel.cache_clear()


@pytest.mark.parametrize("scale", [(0.1, 2.0), (0.5, 1.5), (1.4, 1.6)])
def test_mosaic_filled_only_where_the_warp_reads_gives_the_same_pixels(scale) -> None:
    ds = TinyDataset(8, seed=3)
    hw = (96, 128)
    wrap = MosaicDetection(ds, hw, mosaic_prob=1.0, hsv_prob=0.0, flip_prob=0.0,
                           enable_mixup=False, mosaic_scale=scale, degrees=10, shear=2)
    for seed in range(25):
        image, targets, _, _ = wrap[(seed % 8, seed)]
        # The same draws, the whole canvas built and warped.
        rng = np.random.default_rng(seed)
        rng.random()
        yc, xc = int(rng.uniform(0.5 * hw[0], 1.5 * hw[0])), int(rng.uniform(0.5 * hw[1],
                                                                              1.5 * hw[1]))
        indices = [seed % 8] + [int(i) for i in rng.integers(0, 8, 3)]
        items = [ds.pull_item(i)[:2] for i in indices]
        canvas, boxes = build_mosaic(items, hw, xc, yc)
        full, full_boxes = random_affine(canvas, boxes, hw, 10, 0.1, scale, 2, rng=rng)
        assert np.array_equal(image, full), seed
        assert len(targets[targets[:, 3] > 0]) == len(full_boxes), seed


def test_source_window_covers_what_the_warp_reads() -> None:
    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    for _ in range(40):
        m, s = affine_matrix(src.shape[:2], (100, 120), 10, 0.1, (0.3, 2.0), 2, rng)
        x1, y1, x2, y2 = source_window(m, (100, 120), src.shape[:2])
        masked = np.full_like(src, 7)
        masked[y1:y2, x1:x2] = src[y1:y2, x1:x2]  # anything outside the window is replaced
        assert np.array_equal(warp_affine(masked, np.zeros((0, 5)), m, s, (100, 120))[0],
                              warp_affine(src, np.zeros((0, 5)), m, s, (100, 120))[0])


def test_multiscale_deterministic_and_in_range() -> None:
    sizes = [multiscale_size(it, (416, 416), 3, 10, seed=7) for it in range(0, 400)]
    assert sizes[:10] == [(416, 416)] * 10
    assert all(sizes[i] == sizes[i - i % 10] for i in range(400))  # constant within an interval
    assert all(h % 32 == 0 and w % 32 == 0 and 320 <= h <= 512 and h == w for h, w in sizes)
    assert len(set(sizes)) >= 4
    assert sizes == [multiscale_size(it, (416, 416), 3, 10, seed=7) for it in range(400)]
    assert sizes != [multiscale_size(it, (416, 416), 3, 10, seed=8) for it in range(400)]
    assert multiscale_size(55, (416, 416), 0, 10) == (416, 416)
    h, w = multiscale_size(123, (320, 480), 2, 5, seed=1)
    assert h % 32 == 0 and w % 32 == 0 and abs(w / h - 1.5) < 0.2


def test_resize_batch_scales_targets_with_pixels() -> None:
    img = np.zeros((64, 96, 3), np.uint8)
    img[8:40, 16:64] = COLOURS[1]
    images = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32))[None]
    targets = torch.zeros(1, 4, 5)
    targets[0, 0] = torch.tensor([1, 40, 24, 48, 32])  # cls, cx, cy, w, h
    out, t = resize_batch(images, targets, (128, 96))
    assert out.shape == (1, 3, 128, 96) and targets[0, 0, 2] == 24  # input not modified
    assert torch.all(t[0, 1:] == 0)
    hwc = out[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    check_boxes_follow_pixels(hwc, targets_to_xyxy(t[0].numpy()), min_iou=0.9)
