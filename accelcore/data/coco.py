"""COCO-format detection dataset (any COCO-style json, images of any size).

Bad data policy (every message names the file or id involved):

* missing root / image folder / json, corrupt json, json without ``images`` or ``categories``
  -> :class:`~accelcore.errors.DataError` at construction;
* image listed in the json but missing (or empty) on disk -> dropped at construction with one
  ``warnings.warn`` naming the files;
* image that exists but cannot be decoded -> :class:`~accelcore.errors.ImageReadError` (a
  :class:`DataError`) naming the file and image id when it is loaded (decoding every image up
  front would cost as much as an epoch); the training wrapper skips it with
  ``data.on_bad_image: skip`` (:class:`~accelcore.data.mosaic.MosaicDetection`);
* annotation partly outside its image -> clipped; dropped if nothing is left; one warning per
  dataset naming the image ids;
* annotation with a category id not in ``categories`` -> dropped with a warning naming the
  annotation id and the category id;
* crowd annotations are ignored for training (COCOeval still uses them as "ignore" regions);
* image without annotations -> kept as a background image.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from accelcore.data.preprocess import read_image
from accelcore.errors import DataError, ImageReadError

log = logging.getLogger(__name__)

#: ``cache: auto`` keeps decoded images in RAM when they take at most this share of the memory
#: available: decoding was ~30% of the loader's time for 416 px training (2-core Zen 4).
AUTO_CACHE_FRACTION = 0.2


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)

# A box sticking out of its image by less than this (pixels) is clipped silently: COCO's own
# annotations routinely overshoot by a fraction of a pixel.
_CLIP_TOLERANCE = 1.0


def _summarise(items: list[Any], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" … and {len(items) - limit} more" if len(items) > limit else "")


def load_coco_json(json_path: str | Path) -> dict:
    """Read a COCO json with a one-line :class:`DataError` for missing, corrupt or wrong files."""
    path = Path(json_path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"corrupt annotation json {path}: {e.msg} at line {e.lineno} column {e.colno} "
            f"(char {e.pos})"
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(f"annotation file {path} is not UTF-8 text: {e}") from None
    if not isinstance(data, dict):
        raise DataError(f"annotation json {path} must hold an object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"annotation json {path} has no '{key}' list (not COCO format)")
    if not data["categories"]:
        raise DataError(f"annotation json {path} declares no categories")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(f"annotation json {path}: 'annotations' must be a list")
    data.setdefault("annotations", [])
    return data


def _normalise_annotations(data: dict, path: Path) -> None:
    """Fill fields pycocotools/COCOeval need but hand-made jsons often omit (area, iscrowd, id)."""
    used_ids = {a["id"] for a in data["annotations"] if isinstance(a, dict) and "id" in a}
    next_id = max((i for i in used_ids if isinstance(i, int)), default=0) + 1
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            raise DataError(f"{path}: annotation #{k} lacks image_id/category_id")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            raise DataError(f"{path}: annotation {ann.get('id', f'#{k}')} has no 4-number bbox")
        if "id" not in ann:
            ann["id"] = next_id
            next_id += 1
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(max(0.0, bbox[2]) * max(0.0, bbox[3]))
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DataError(f"{path}: image entry #{k} lacks id/file_name")


def coco_from_dict(data: dict) -> COCO:
    """Build a pycocotools ``COCO`` from an in-memory dict (no re-read, no stdout chatter)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class COCODataset:
    """Detection items from a COCO-style folder: ``root/<image_dir>/``, ``root/annotations/<json>``.

    ``dataset[i]`` -> ``(image_bgr_uint8_HWC, boxes float32 [K,5] = x1,y1,x2,y2,class_index,
    (h, w), image_id)``. Class indices are contiguous, in ascending category-id order
    (``cat_ids[class_index]`` is the COCO category id).
    """

    def __init__(
        self,
        root: str | Path,
        image_dir: str = "train2017",
        json_file: str = "instances_train2017.json",
        cache: bool | str = False,
        cache_threads: int = 2,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"dataset root not found: {self.root}")
        self.image_dir = self.root / image_dir
        if not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir}")
        json_path = Path(json_file)
        if not json_path.is_absolute():
            json_path = self.root / "annotations" / json_file
        self.json_path = json_path
        self.name = image_dir

        data = load_coco_json(self.json_path)
        _normalise_annotations(data, self.json_path)
        self.coco = coco_from_dict(data)

        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids: list[int] = [int(c["id"]) for c in categories]
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in categories]
        self.num_classes = len(self.cat_ids)
        self._cat_to_class = {cid: i for i, cid in enumerate(self.cat_ids)}

        self.ids: list[int] = []
        self._files: list[Path] = []
        self._sizes: list[tuple[int, int] | None] = []
        self._check_files(data)
        self.annotations: list[np.ndarray] = self._load_annotations()

        self._cache: list[np.ndarray | None] | None = None
        if cache not in (True, False, "auto"):
            raise DataError(f"data.cache: expected true, false or auto, got {cache!r}")
        if cache == "auto":
            need = self.decoded_bytes()
            if need is not None and need <= AUTO_CACHE_FRACTION * _available_memory():
                log.info("caching %d decoded images of %s in RAM (%.0f MB; data.cache: auto)",
                         len(self.ids), self.image_dir, need / 1e6)
                # A bad file is left for its reader to report (data.on_bad_image decides).
                self._cache = self._decode_all(cache_threads, keep_going=True)
        elif cache:
            self._cache = self._decode_all(cache_threads)

    # ------------------------------------------------------------------ construction helpers
    def _check_files(self, data: dict) -> None:
        # One listdir is much faster than a stat per image on large sets (118k files for COCO).
        try:
            present = {e.name: e for e in os.scandir(self.image_dir)}
        except OSError as e:
            raise DataError(f"cannot list image folder {self.image_dir}: {e}") from None
        missing: list[str] = []
        seen: set[int] = set()
        for img in data["images"]:
            if img["id"] in seen:
                continue
            seen.add(img["id"])
            name = str(img["file_name"])
            entry = present.get(name)
            path = self.image_dir / name
            if entry is None and "/" in name:  # file_name with sub-folders
                ok = path.is_file() and path.stat().st_size > 0
            else:
                ok = entry is not None and entry.is_file() and entry.stat().st_size > 0
            if not ok:
                missing.append(name)
                continue
            self.ids.append(int(img["id"]))
            self._files.append(path)
            w, h = img.get("width"), img.get("height")
            self._sizes.append((int(h), int(w)) if w and h else None)
        if missing:
            warnings.warn(
                f"{self.json_path.name}: skipped {len(missing)} image(s) missing or empty in "
                f"{self.image_dir}: {_summarise(missing)}",
                stacklevel=3,
            )

    def _load_annotations(self) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        clipped_images: list[int] = []
        unknown: list[str] = []
        n_clipped = n_dropped = 0
        for index, img_id in enumerate(self.ids):
            size = self._sizes[index]
            rows = []
            touched = False
            for ann in self.coco.imgToAnns.get(img_id, []):
                if ann.get("iscrowd", 0):
                    continue
                cls = self._cat_to_class.get(ann["category_id"])
                if cls is None:
                    unknown.append(f"annotation {ann['id']} (category id {ann['category_id']})")
                    continue
                x, y, w, h = (float(v) for v in ann["bbox"])
                x1, y1, x2, y2 = x, y, x + max(w, 0.0), y + max(h, 0.0)
                if size is not None:
                    ih, iw = size
                    outside = max(-x1, -y1, x2 - iw, y2 - ih)
                    x1, x2 = min(max(x1, 0.0), iw), min(max(x2, 0.0), iw)
                    y1, y2 = min(max(y1, 0.0), ih), min(max(y2, 0.0), ih)
                    if outside > _CLIP_TOLERANCE:
                        touched = True
                        n_clipped += 1
                if x2 - x1 <= 0 or y2 - y1 <= 0:
                    n_dropped += 1
                    touched = True
                    continue
                rows.append((x1, y1, x2, y2, cls))
            if touched:
                clipped_images.append(img_id)
            out.append(np.array(rows, dtype=np.float32).reshape(-1, 5))
        if unknown:
            warnings.warn(
                f"{self.json_path.name}: dropped {len(unknown)} annotation(s) with a category id "
                f"not in 'categories': {_summarise(unknown)}",
                stacklevel=4,
            )
        if clipped_images:
            warnings.warn(
                f"{self.json_path.name}: {n_clipped} annotation(s) outside their image were "
                f"clipped and {n_dropped} degenerate one(s) dropped; image ids: "
                f"{_summarise(clipped_images)}",
                stacklevel=4,
            )
        return out

    def decoded_bytes(self) -> int | None:
        """RAM the decoded images take (from the json's sizes; None if a size is missing)."""
        if any(size is None for size in self._sizes):
            return None
        return sum(3 * h * w for h, w in self._sizes)

    def _decode_all(self, threads: int, keep_going: bool = False) -> list[np.ndarray | None]:
        def read(index: int) -> np.ndarray | None:
            try:
                img = self._read(index)
            except ImageReadError:
                if keep_going:
                    return None
                raise
            img.flags.writeable = False  # handed out as is: see load_image
            return img

        # File reads and OpenCV decodes release the GIL: a small thread pool overlaps them.
        with ThreadPoolExecutor(max(1, threads)) as pool:
            return list(pool.map(read, range(len(self.ids))))

    def _read(self, index: int) -> np.ndarray:
        path = self._files[index]
        try:
            return read_image(path)
        except ImageReadError as exc:  # the same error, with the image id added
            text = str(exc).replace(f" {path}:", f" {path} (image id {self.ids[index]}):", 1)
            raise ImageReadError(text, exc.path) from None

    # ------------------------------------------------------------------ dataset protocol
    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, index: int) -> np.ndarray:
        """The BGR uint8 image: from the cache, the cached array itself, read-only (every
        augmentation makes new arrays; an in-place write raises rather than alter the cache, and
        no copy is made — 4-5 images per mosaic sample); else freshly decoded."""
        cached = None if self._cache is None else self._cache[index]
        if cached is not None:
            return cached
        return self._read(index)

    def load_anno(self, index: int) -> np.ndarray:
        """Boxes ``[K, 5]`` (x1, y1, x2, y2, class_index) without decoding the image."""
        return self.annotations[index]

    def pull_item(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int], int]:
        img = self.load_image(index)
        return img, self.annotations[index].copy(), (img.shape[0], img.shape[1]), self.ids[index]

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int], int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        return self.pull_item(index % len(self))

    def file_of(self, index: int) -> Path:
        return self._files[index]

    def __repr__(self) -> str:
        return (
            f"COCODataset({str(self.image_dir)!r}, images={len(self)}, "
            f"classes={self.num_classes}, cache={self._cache is not None})"
        )
