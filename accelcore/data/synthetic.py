"""Synthetic COCO-format detection data: coloured shapes on textured backgrounds.

Each class is one shape drawn in its own hue band (vivid) on a low-saturation textured
background (gradient, stripes or smooth noise), so a small detector such as yolox_nano learns it
in minutes on a CPU. Everything is a pure function of the parameters: image ``i`` of a split
depends only on (seed, split, i), so the training images do not change when ``val_images`` does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from accelcore.errors import DataError

GENERATOR_VERSION = 1
PARAMS_FILE = "synthetic.json"

SHAPES = ("circle", "square", "triangle", "ring", "cross", "diamond", "star", "hexagon")
# (name, OpenCV hue 0..179) per shape; classes 8..15 reuse the shapes in the opposite hue.
COLOURS = (
    ("red", 0),
    ("green", 60),
    ("blue", 120),
    ("yellow", 28),
    ("magenta", 150),
    ("cyan", 92),
    ("orange", 14),
    ("purple", 135),
)
MAX_CLASSES = 2 * len(SHAPES)
_HUE_NAMES = {0: "red", 14: "orange", 28: "yellow", 60: "green", 92: "cyan", 120: "blue",
              135: "purple", 150: "magenta"}


def class_table(num_classes: int) -> list[tuple[str, str, int]]:
    """``(class_name, shape, hue)`` for each class index."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise DataError(f"synthetic num_classes must be 1..{MAX_CLASSES}, got {num_classes}")
    table = []
    for i in range(num_classes):
        shape = SHAPES[i % len(SHAPES)]
        colour, hue = COLOURS[i % len(COLOURS)]
        if i >= len(SHAPES):
            hue = (hue + 90) % 180
            colour = _HUE_NAMES.get(hue, f"hue{hue}")
        table.append((f"{colour}_{shape}", shape, hue))
    return table


def _dull_colour(rng: np.random.Generator) -> np.ndarray:
    # Backgrounds stay grey-ish so that saturated objects are the salient thing.
    # Channel offsets proportional to brightness keep saturation below ~0.35 (objects: >= 0.66).
    base = rng.uniform(35, 220)
    return np.clip(base * (1 + rng.uniform(-0.18, 0.18, 3)), 0, 255).astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    a, b = _dull_colour(rng), _dull_colour(rng)
    kind = int(rng.integers(0, 3))
    xx = np.arange(w, dtype=np.float32)[None, :]
    yy = np.arange(h, dtype=np.float32)[:, None]
    if kind == 0:  # linear gradient at a random angle
        t = rng.uniform(0, 2 * math.pi)
        ramp = xx * math.cos(t) + yy * math.sin(t)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    elif kind == 1:  # sinusoidal stripes
        t = rng.uniform(0, math.pi)
        period = rng.uniform(8, 48)
        ramp = 0.5 + 0.5 * np.sin((xx * math.cos(t) + yy * math.sin(t)) * (2 * math.pi / period))
    else:  # smooth blotches: coarse noise upsampled
        cells = int(rng.integers(3, 12))
        coarse = rng.random((cells, cells), dtype=np.float32)
        ramp = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    # Colour through a 3-channel lookup table: much cheaper than float maths on H*W*3 pixels.
    levels = np.arange(256, dtype=np.float32)[:, None] / 255.0
    lut = np.clip(a + (b - a) * levels, 0, 255).astype(np.uint8).reshape(1, 256, 3)
    ramp_u8 = (ramp * 255).astype(np.uint8)
    return cv2.LUT(cv2.merge([ramp_u8, ramp_u8, ramp_u8]), lut)


_NOISE_BANK: dict[int, np.ndarray] = {}


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Unit gaussian noise [h, w, 3]: a random window of a fixed bank (drawing 0.5M normals per
    image would dominate generation time). Deterministic: the bank has a fixed seed.
    """
    side = 1 << max(9, math.ceil(math.log2(max(h, w))))
    bank = _NOISE_BANK.get(side)
    if bank is None:
        bank = np.random.default_rng(0x5EED).standard_normal((2 * side, 2 * side, 3), np.float32)
        _NOISE_BANK[side] = bank
    y, x = int(rng.integers(0, side)), int(rng.integers(0, side))
    return bank[y : y + h, x : x + w]


def _object_colour(rng: np.random.Generator, hue: int) -> tuple[int, int, int]:
    hsv = np.array(
        [[[(hue + rng.integers(-5, 6)) % 180, rng.integers(170, 256), rng.integers(150, 256)]]],
        dtype=np.uint8,
    )
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _polygon(shape: str, r: float, angle: float) -> np.ndarray:
    """Vertices of ``shape`` with circumradius ~r around the origin, rotated by ``angle``."""
    if shape == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(4) * math.pi / 2 + math.pi / 4]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3]
    elif shape == "hexagon":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in np.arange(6) * math.pi / 3]
    elif shape == "diamond":
        pts = [(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)]
    elif shape == "star":
        pts = [
            ((r if k % 2 == 0 else 0.45 * r) * math.cos(a), (r if k % 2 == 0 else 0.45 * r)
             * math.sin(a))
            for k, a in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2)
        ]
    elif shape == "cross":
        t = 0.33 * r
        pts = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t),
               (-r, t), (-r, -t), (-t, -t)]
    else:
        raise ValueError(f"not a polygon shape: {shape}")
    p = np.asarray(pts, dtype=np.float64)
    c, s = math.cos(angle), math.sin(angle)
    return p @ np.array([[c, s], [-s, c]])


def _iou(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter + 1e-9), inter / (min(area_a, area_b) + 1e-9)


def render_image(
    rng: np.random.Generator, size: int, classes: list[tuple[str, str, int]]
) -> tuple[np.ndarray, list[tuple[float, float, float, float, int]]]:
    """One BGR image and its boxes ``(x1, y1, x2, y2, class_index)``."""
    short = int(size * rng.uniform(0.75, 1.0)) // 2 * 2
    h, w = (size, short) if rng.random() < 0.5 else (short, size)
    canvas = _background(rng, h, w)

    boxes: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, 7))):
        for _attempt in range(30):
            cls = int(rng.integers(0, len(classes)))
            r = size * rng.uniform(0.04, 0.17)
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            shape = classes[cls][1]
            if shape in ("circle", "ring"):
                ri = max(3, int(round(r)))
                cxi, cyi = int(round(cx)), int(round(cy))
                box = np.array([cxi - ri, cyi - ri, cxi + ri + 1, cyi + ri + 1], dtype=np.float64)
                pts = None
            else:
                pts = _polygon(shape, r, rng.uniform(0, 2 * math.pi)) + (cx, cy)
                box = np.array([*pts.min(0), *(pts.max(0) + 1)], dtype=np.float64)
            box[[0, 2]] = box[[0, 2]].clip(0, w)
            box[[1, 3]] = box[[1, 3]].clip(0, h)
            if all(max(_iou(box, other)) <= 0.3 for other in boxes):
                break
        else:
            continue  # crowded image: fewer objects
        colour = _object_colour(rng, classes[cls][2])
        if pts is None:
            if shape == "circle":
                cv2.circle(canvas, (cxi, cyi), ri, colour, -1, cv2.LINE_AA)
            else:
                thick = max(2, int(round(ri * 0.35)))
                cv2.circle(canvas, (cxi, cyi), ri - thick // 2, colour, thick, cv2.LINE_AA)
        else:
            # shift=4: sub-pixel vertices, so small rotated shapes keep their outline
            cv2.fillPoly(canvas, [np.round(pts * 16).astype(np.int32)], colour, cv2.LINE_AA, 4)
        boxes.append(box)
        labels.append(cls)

    noisy = _noise(rng, h, w) * np.float32(rng.uniform(2, 10))
    noisy += canvas
    canvas = np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)
    if rng.random() < 0.3:
        canvas = cv2.GaussianBlur(canvas, (3, 3), 0)
    return canvas, [(*map(float, b), c) for b, c in zip(boxes, labels, strict=True)]


def _write_split(
    out_dir: Path, split: str, count: int, size: int, seed: int, classes: list, threads: int
) -> dict:
    img_dir = out_dir / f"{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    split_code = 0 if split == "train" else 1

    def one(i: int) -> tuple[dict, list]:
        rng = np.random.default_rng([seed & 0xFFFFFFFF, split_code, i])
        img, boxes = render_image(rng, size, classes)
        name = f"{i:06d}.jpg"
        if not cv2.imwrite(str(img_dir / name), img, [cv2.IMWRITE_JPEG_QUALITY, 92]):
            raise DataError(f"cannot write {img_dir / name}")
        info = {"id": i + 1, "file_name": name, "height": img.shape[0], "width": img.shape[1]}
        return info, boxes

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(one, range(count)))

    images, annotations = [], []
    for info, boxes in results:
        images.append(info)
        for x1, y1, x2, y2, cls in boxes:
            bw, bh = round(x2 - x1, 2), round(y2 - y1, 2)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": info["id"],
                "category_id": cls + 1,
                "bbox": [round(x1, 2), round(y1, 2), bw, bh],
                "area": round(bw * bh, 2),
                "iscrowd": 0,
            })
    categories = [
        {"id": i + 1, "name": name, "supercategory": shape}
        for i, (name, shape, _) in enumerate(classes)
    ]
    doc = {
        "info": {"description": "accelcore synthetic shapes", "version": GENERATOR_VERSION},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    with open(out_dir / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump(doc, f)
    return doc


def _params(images: int, val_images: int, size: int, seed: int, num_classes: int) -> dict:
    if images < 1 or val_images < 0:
        raise DataError(f"synthetic needs images >= 1 and val_images >= 0, got {images}, "
                        f"{val_images}")
    if size < 32:
        raise DataError(f"synthetic image size must be >= 32, got {size}")
    class_table(num_classes)  # validates
    return {
        "version": GENERATOR_VERSION,
        "images": int(images),
        "val_images": int(val_images),
        "size": int(size),
        "seed": int(seed),
        "num_classes": int(num_classes),
    }


def synthesize(
    out_dir: str | Path,
    images: int = 512,
    val_images: int = 64,
    size: int = 416,
    seed: int = 0,
    num_classes: int = 8,
    threads: int = 2,
) -> Path:
    """Write a COCO-format folder (``train2017/``, ``val2017/``, ``annotations/``) and return it.

    ``size`` is the longer image side (the shorter one is 75-100 % of it).
    """
    params = _params(images, val_images, size, seed, num_classes)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    classes = class_table(num_classes)
    _write_split(out, "train", images, size, seed, classes, threads)
    _write_split(out, "val", val_images, size, seed, classes, threads)
    with open(out / PARAMS_FILE, "w") as f:  # written last: marks the folder complete
        json.dump(params, f, indent=1)
    return out


def _read_params(folder: Path) -> dict | None:
    try:
        with open(folder / PARAMS_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ensure_synthetic(cache_dir: str | Path, **params: Any) -> Path:
    """Return a synthetic dataset folder for ``params`` under ``cache_dir``, generating it only
    if no folder made with identical parameters exists. Safe when several ranks call it at once
    (each generates into a private folder and the first atomic rename wins).
    """
    full = _params(
        params.pop("images", 512),
        params.pop("val_images", 64),
        params.pop("size", 416),
        params.pop("seed", 0),
        params.pop("num_classes", 8),
    )
    threads = int(params.pop("threads", 2))
    if params:
        raise DataError(f"unknown synthetic parameter(s): {', '.join(sorted(params))}")
    cache = Path(cache_dir).expanduser()
    key = hashlib.sha1(json.dumps(full, sort_keys=True).encode()).hexdigest()[:12]
    final = cache / f"synthetic-{key}"
    if _read_params(final) == full:
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        synthesize(tmp, threads=threads, **{k: v for k, v in full.items() if k != "version"})
        if final.exists() and _read_params(final) != full:
            shutil.rmtree(final, ignore_errors=True)  # stale or half-deleted folder
        try:
            os.rename(tmp, final)
        except OSError:
            if _read_params(final) != full:  # lost the race to a broken writer
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

