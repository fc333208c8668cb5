"""``accelcore predict``: run a saved artifact on an image, a folder of images or a video.

Writes annotated copies (boxes + class + score) and, for images, ``detections.json`` in COCO
results style (``image``, ``bbox`` [x, y, w, h] in original pixels, ``score``,
``category_id`` = class index, ``category``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from accelcore.errors import AccelcoreError

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXT = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="detect objects with a saved artifact",
                              description="Run an artifact (<run>/artifacts/<method>/) on images "
                                          "or a video and write annotated outputs.")
    p.add_argument("--model", required=True, metavar="ARTIFACT", help="artifact folder")
    p.add_argument("--source", required=True, help="image file, folder of images, or video")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--conf", type=float, default=0.3, help="score threshold (default 0.3)")
    p.add_argument("--nms", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward (default: the artifact's batch size)")
    p.set_defaults(handler=handle)


def _colour(index: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(index * 7919 + 1)
    return tuple(int(c) for c in rng.integers(60, 255, size=3))


def draw(image: np.ndarray, dets: np.ndarray, class_names: list[str]) -> np.ndarray:
    """A copy of ``image`` with boxes and "class score" labels drawn."""
    import cv2

    out = image.copy()
    for x1, y1, x2, y2, score, cls in dets:
        c = int(cls)
        colour = _colour(c)
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(out, p1, p2, colour, 2)
        name = class_names[c] if 0 <= c < len(class_names) else str(c)
        label = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        top = max(p1[1], th + base + 2)
        cv2.rectangle(out, (p1[0], top - th - base - 2), (p1[0] + tw + 2, top), colour, -1)
        cv2.putText(out, label, (p1[0] + 1, top - base - 1), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return out


def _records(name: str, dets: np.ndarray, class_names: list[str]) -> list[dict]:
    return [{"image": name, "bbox": [round(float(x1), 2), round(float(y1), 2),
                                     round(float(x2 - x1), 2), round(float(y2 - y1), 2)],
             "score": round(float(s), 4), "category_id": int(c),
             "category": class_names[int(c)] if 0 <= int(c) < len(class_names) else str(int(c))}
            for x1, y1, x2, y2, s, c in dets]


def predict_images(model, files: list[Path], out: Path, conf: float, nms: float,
                   batch_size: int | None) -> list[dict]:
    import cv2

    step = batch_size or model.batch_size
    records: list[dict] = []
    for start in range(0, len(files), step):
        chunk = files[start:start + step]
        images = []
        for f in chunk:
            img = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if img is None:
                raise AccelcoreError(f"--source: cannot read image {f}")
            images.append(img)
        found = model.predict(images, conf=conf, nms=nms, batch_size=step)
        for f, img, dets in zip(chunk, images, found, strict=True):
            cv2.imwrite(str(out / f.name), draw(img, dets, model.class_names))
            records.extend(_records(f.name, dets, model.class_names))
    (out / "detections.json").write_text(json.dumps(records, indent=1))
    return records


def predict_video(model, path: Path, out: Path, conf: float, nms: float) -> Path:
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise AccelcoreError(f"--source: cannot open video {path}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    target = out / (path.stem + "_pred.mp4")
    writer = None
    frames = 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
            dets = model.predict([frame], conf=conf, nms=nms, batch_size=1)[0]
            writer.write(draw(frame, dets, model.class_names))
            frames += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()
    if frames == 0:
        raise AccelcoreError(f"--source: no frames could be read from {path}")
    return target


def handle(args: argparse.Namespace) -> int:
    from accelcore.inference.artifact import load_artifact

    source = Path(args.source)
    if not source.exists():
        raise AccelcoreError(f"--source: not found: {source}")
    model = load_artifact(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXT)
        if not files:
            raise AccelcoreError(f"--source: no images ({', '.join(sorted(IMAGE_EXT))}) in "
                                 f"{source}")
    elif source.suffix.lower() in VIDEO_EXT:
        target = predict_video(model, source, out, args.conf, args.nms)
        print(f"accelcore: {model.method}: annotated video -> {target}")
        return 0
    else:
        files = [source]
    records = predict_images(model, files, out, args.conf, args.nms, args.batch_size)
    print(f"accelcore: {model.method}: {len(records)} detections in {len(files)} image(s) -> "
          f"{out}")
    return 0
