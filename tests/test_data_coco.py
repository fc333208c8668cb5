"""COCODataset, letterbox preprocessing, and the bad-data policy."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from accelcore.data.coco import COCODataset
from accelcore.data.preprocess import letterbox, preprocess_batch
from accelcore.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def coco128_root() -> Path:
    env = os.environ.get("ACCELCORE_COCO128")
    root = Path(env) if env else REPO.parent / "shared" / "data" / "coco128"
    if not (root / "annotations" / "instances_train2017.json").is_file():
        pytest.skip(f"coco128 not found at {root} (set ACCELCORE_COCO128 to its folder)")
    return root


CATS = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 12, "name": "bird"}]


def write_dataset(
    root: Path, images: list[tuple[int, int, int]], anns: list[dict], write_images: bool = True
) -> Path:
    """images: (id, h, w); each image is a distinct flat colour so loads can be told apart."""
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    entries = []
    for img_id, h, w in images:
        name = f"{img_id:04d}.png"
        if write_images:
            cv2.imwrite(str(root / "train2017" / name), np.full((h, w, 3), img_id % 250, np.uint8))
        entries.append({"id": img_id, "file_name": name, "height": h, "width": w})
    doc = {"images": entries, "annotations": anns, "categories": CATS}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    return root


def ann(i: int, img: int, cat: int, bbox: list[float], crowd: int = 0) -> dict:
    return {"id": i, "image_id": img, "category_id": cat, "bbox": bbox, "iscrowd": crowd,
            "area": bbox[2] * bbox[3]}


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    return write_dataset(
        tmp_path / "ds",
        [(1, 40, 60), (2, 100, 30), (3, 20, 20)],
        [
            ann(1, 1, 7, [5, 5, 10, 20]),
            ann(2, 1, 12, [30, 10, 20, 10]),
            ann(3, 1, 3, [0, 0, 60, 40], crowd=1),
            ann(4, 2, 3, [1, 2, 3, 4]),
        ],
    )


def test_items_mapping_and_crowd(small: Path) -> None:
    ds = COCODataset(small, "train2017", "instances_train2017.json")
    assert ds.cat_ids == [3, 7, 12] and ds.class_names == ["dog", "cat", "bird"]
    assert ds.num_classes == 3 and len(ds) == 3 and ds.ids == [1, 2, 3]
    img, boxes, hw, img_id = ds[0]
    assert img.shape == (40, 60, 3) and img.dtype == np.uint8 and hw == (40, 60) and img_id == 1
    assert boxes.dtype == np.float32
    # crowd box ignored; class index follows sorted category ids (7 -> 1, 12 -> 2)
    np.testing.assert_allclose(boxes, [[5, 5, 15, 25, 1], [30, 10, 50, 20, 2]])
    img, boxes, hw, img_id = ds[1]
    assert hw == (100, 30) and img_id == 2 and int(img[0, 0, 0]) == 2
    np.testing.assert_allclose(boxes, [[1, 2, 4, 6, 0]])
    img, boxes, hw, _ = ds[2]  # no annotations: kept as background
    assert boxes.shape == (0, 5) and hw == (20, 20)
    assert len(ds.coco.getImgIds()) == 3
    with pytest.raises(IndexError):
        ds[3]


def test_cache_returns_same_items_and_protects_cache(small: Path) -> None:
    plain = COCODataset(small)
    cached = COCODataset(small, cache=True)
    for i in range(len(plain)):
        a, b = plain[i], cached[i]
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    img = cached[0][0]
    # Handed out without a copy, read-only: an in-place write fails instead of altering it.
    with pytest.raises(ValueError, match="read-only"):
        img[:] = 255
    assert int(cached[0][0][0, 0, 0]) == 1 and cached[0][0] is img
    fresh = plain[0][0]
    fresh[:] = 255  # a decoded (uncached) image is the caller's own
    assert int(plain[0][0][0, 0, 0]) == 1


def test_auto_cache_decides_by_the_memory_available(small: Path, monkeypatch) -> None:
    import accelcore.data.coco as coco

    need = 3 * (40 * 60 + 100 * 30 + 20 * 20)
    monkeypatch.setattr(coco, "_available_memory", lambda: int(need / coco.AUTO_CACHE_FRACTION))
    fits = COCODataset(small, cache="auto")
    assert fits.decoded_bytes() == need and fits._cache is not None
    monkeypatch.setattr(coco, "_available_memory", lambda: int(need / coco.AUTO_CACHE_FRACTION) - 1)
    assert COCODataset(small, cache="auto")._cache is None
    plain = COCODataset(small, cache=False)
    for i in range(len(plain)):
        np.testing.assert_array_equal(fits[i][0], plain[i][0])
    with pytest.raises(DataError, match="data.cache"):
        COCODataset(small, cache="sometimes")


def test_auto_cache_leaves_a_bad_image_to_its_reader(small: Path) -> None:
    """cache: auto must not turn data.on_bad_image: skip into a failure at start-up."""
    (small / "train2017" / "0003.png").write_bytes(b"not a png at all")
    ds = COCODataset(small, cache="auto")
    assert ds._cache is not None and ds._cache[2] is None
    ds[0]
    with pytest.raises(DataError, match=r"cannot decode image .*0003\.png \(image id 3\)"):
        ds[2]
    with pytest.raises(DataError, match=r"0003\.png"):
        COCODataset(small, cache=True)  # asked for explicitly: every image up front


def test_missing_root_folder_and_json(tmp_path: Path, small: Path) -> None:
    with pytest.raises(DataError, match="dataset root not found"):
        COCODataset(tmp_path / "nope")
    with pytest.raises(DataError, match=r"image folder not found: .*val2017"):
        COCODataset(small, "val2017")
    with pytest.raises(DataError, match=r"annotation file not found: .*instances_val2017.json"):
        COCODataset(small, "train2017", "instances_val2017.json")


def test_corrupt_json_names_file_and_position(small: Path) -> None:
    path = small / "annotations" / "instances_train2017.json"
    path.write_text('{"images": [\n  {"id": 1,, }]}')
    with pytest.raises(DataError) as e:
        COCODataset(small)
    msg = str(e.value)
    assert "instances_train2017.json" in msg and "line 2" in msg and "\n" not in msg
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="no 'categories'"):
        COCODataset(small)


def test_missing_image_skipped_with_warning(small: Path) -> None:
    (small / "train2017" / "0002.png").unlink()
    with pytest.warns(UserWarning, match=r"skipped 1 image.*0002\.png"):
        ds = COCODataset(small)
    assert ds.ids == [1, 3] and len(ds.annotations) == 2


def test_corrupt_image_raises_naming_file(small: Path) -> None:
    (small / "train2017" / "0003.png").write_bytes(b"not a png at all")
    ds = COCODataset(small)  # existence is checked up front, decoding on load
    with pytest.raises(DataError, match=r"cannot decode image .*0003\.png \(image id 3\)"):
        ds[2]


def test_out_of_image_boxes_clipped_or_dropped(tmp_path: Path) -> None:
    root = write_dataset(
        tmp_path / "ds",
        [(5, 50, 50), (6, 50, 50)],
        [
            ann(1, 5, 7, [-10, 40, 30, 30]),  # clipped to [0, 40, 20, 50]
            ann(2, 6, 7, [60, 60, 10, 10]),  # entirely outside: dropped
            ann(3, 6, 3, [10, 10, 0, 5]),  # zero width: dropped
            ann(4, 6, 3, [10, 10, 5, 5]),
        ],
    )
    with pytest.warns(UserWarning, match=r"clipped.*dropped.*image ids: 5, 6"):
        ds = COCODataset(root)
    np.testing.assert_allclose(ds.load_anno(0), [[0, 40, 20, 50, 1]])
    np.testing.assert_allclose(ds.load_anno(1), [[10, 10, 15, 15, 0]])


def test_unknown_category_warned_and_dropped(tmp_path: Path) -> None:
    root = write_dataset(
        tmp_path / "ds", [(1, 30, 30)], [ann(11, 1, 99, [1, 1, 5, 5]), ann(12, 1, 3, [2, 2, 4, 4])]
    )
    with pytest.warns(UserWarning, match=r"annotation 11 \(category id 99\)"):
        ds = COCODataset(root)
    np.testing.assert_allclose(ds.load_anno(0), [[2, 2, 6, 6, 0]])


def test_empty_annotation_list_and_missing_fields(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", [(1, 30, 30), (2, 10, 10)], [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = COCODataset(root)
    assert len(ds) == 2 and all(len(a) == 0 for a in ds.annotations)
    # Hand-made json without area/iscrowd/id still loads (filled in for COCOeval).
    doc = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    doc["annotations"] = [{"image_id": 1, "category_id": 7, "bbox": [1, 1, 4, 4]}]
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(doc))
    ds = COCODataset(root)
    assert ds.coco.anns[1]["area"] == 16 and ds.coco.anns[1]["iscrowd"] == 0


def test_letterbox_matches_yolox_preproc() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (100, 200, 3), dtype=np.uint8)
    chw, ratio = letterbox(img, (64, 96))
    assert chw.shape == (3, 64, 96) and chw.dtype == np.float32 and ratio == pytest.approx(0.48)
    hwc = chw.transpose(1, 2, 0)
    expected = cv2.resize(img, (96, 48), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(hwc[:48], expected)  # top-left placement, BGR, no mean/std
    assert np.all(hwc[48:] == 114)
    tall, r = letterbox(np.zeros((300, 50, 3), np.uint8), (64, 64))
    assert r == pytest.approx(64 / 300) and np.all(tall[:, :, 10:] == 114)
    gray, _ = letterbox(np.zeros((10, 10), np.uint8), (16, 16))
    assert gray.shape == (3, 16, 16)


def test_preprocess_batch() -> None:
    imgs = [np.zeros((40, 80, 3), np.uint8), np.full((90, 30, 3), 200, np.uint8)]
    batch, ratios = preprocess_batch(imgs, (32, 32))
    assert isinstance(batch, torch.Tensor) and batch.shape == (2, 3, 32, 32)
    assert batch.dtype == torch.float32 and ratios == pytest.approx([0.4, 32 / 90])
    assert float(batch[1, 0, 0, 0]) == 200.0 and float(batch[1, 0, 0, 31]) == 114.0


def test_coco128_loads() -> None:
    root = coco128_root()
    ds = COCODataset(root, "train2017", "instances_train2017.json")
    assert ds.num_classes == 80 and len(ds) == 128 and ds.class_names[0] == "person"
    img, boxes, (h, w), img_id = ds[0]
    info = ds.coco.imgs[img_id]
    assert (h, w) == (info["height"], info["width"]) and img.shape == (h, w, 3)
    assert len(boxes) > 0 and boxes[:, 4].max() < 80
    assert np.all(boxes[:, 2] <= w) and np.all(boxes[:, 3] <= h)
    n_boxes = sum(len(a) for a in ds.annotations)
    n_crowd = sum(a["iscrowd"] for a in ds.coco.dataset["annotations"])
    assert n_boxes <= len(ds.coco.dataset["annotations"]) - n_crowd
