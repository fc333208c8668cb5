"""Synthetic shapes generator, its cache, and the data plugin (accelcore_coco)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import accelcore_coco as plugin
import cv2
import numpy as np
import pytest

from accelcore.data.coco import COCODataset
from accelcore.data.synthetic import class_table, ensure_synthetic, synthesize
from accelcore.errors import DataError
from accelcore.interfaces import Declaration

PARAMS = dict(images=10, val_images=4, size=160, seed=3, num_classes=8)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("syn") / "a", **PARAMS)


def test_layout_and_categories(synth: Path) -> None:
    for split, n in (("train", 10), ("val", 4)):
        doc = json.loads((synth / "annotations" / f"instances_{split}2017.json").read_text())
        assert len(doc["images"]) == n and len(list((synth / f"{split}2017").glob("*.jpg"))) == n
        names = [c["name"] for c in doc["categories"]]
        assert names == [name for name, _, _ in class_table(8)] and len(set(names)) == 8
        assert doc["annotations"] and all(a["category_id"] in range(1, 9)
                                          for a in doc["annotations"])
        for info in doc["images"]:
            img = cv2.imread(str(synth / f"{split}2017" / info["file_name"]))
            assert img.shape[:2] == (info["height"], info["width"])
            assert max(img.shape[:2]) == 160


def test_deterministic_and_seed_dependent(synth: Path, tmp_path: Path) -> None:
    again = synthesize(tmp_path / "b", **PARAMS)
    other = synthesize(tmp_path / "c", **{**PARAMS, "seed": 4})
    js = "annotations/instances_train2017.json"
    assert (synth / js).read_bytes() == (again / js).read_bytes()
    assert (synth / "train2017/000003.jpg").read_bytes() == (again / "train2017/000003.jpg")\
        .read_bytes()
    assert (synth / js).read_bytes() != (other / js).read_bytes()


def hue_mask(img: np.ndarray, hue: int) -> np.ndarray:
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.int16)
    dh = np.abs(hsv[..., 0] - hue)
    dh = np.minimum(dh, 180 - dh)
    return (dh <= 8) & (hsv[..., 1] >= 140) & (hsv[..., 2] >= 120)


def test_boxes_cover_their_shapes(synth: Path) -> None:
    doc = json.loads((synth / "annotations" / "instances_train2017.json").read_text())
    hues = {i + 1: hue for i, (_, _, hue) in enumerate(class_table(8))}
    checked = 0
    for info in doc["images"]:
        img = cv2.imread(str(synth / "train2017" / info["file_name"]))
        anns = [a for a in doc["annotations"] if a["image_id"] == info["id"]]
        any_box = np.zeros(img.shape[:2], bool)
        for a in anns:
            x, y, w, h = a["bbox"]
            inside = np.zeros(img.shape[:2], bool)
            inside[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = True
            # JPEG chroma subsampling bleeds colour ~2 px past the shape edge
            any_box[max(0, int(y) - 2) : int(np.ceil(y + h)) + 2,
                    max(0, int(x) - 2) : int(np.ceil(x + w)) + 2] = True
            mask = hue_mask(img, hues[a["category_id"]]) & inside
            if w * h < 150:
                continue
            ys, xs = np.nonzero(mask)
            assert len(xs) > 0.15 * w * h, f"image {info['id']} ann {a['id']}: shape not in box"
            pix = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            # The shape spans its box (allow a few pixels for antialiasing and occlusion).
            assert pix[0] - x <= 4 and pix[1] - y <= 4
            assert x + w - pix[2] <= 4 and y + h - pix[3] <= 4
            checked += 1
        vivid = np.zeros(img.shape[:2], bool)
        for hue in hues.values():
            vivid |= hue_mask(img, hue)
        # (nearly) no object pixels outside the boxes
        assert (vivid & ~any_box).sum() <= 0.002 * vivid.size
    assert checked >= 10


def test_generation_is_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    synthesize(tmp_path / "fast", images=60, val_images=0, size=320)
    assert time.perf_counter() - t0 < 15  # generous: ~10 ms/image on a busy 2-core machine


def test_ensure_synthetic_reuses_identical_params(tmp_path: Path) -> None:
    first = ensure_synthetic(tmp_path, **PARAMS)
    stamp = (first / "synthetic.json").stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, **PARAMS) == first
    assert (first / "synthetic.json").stat().st_mtime_ns == stamp  # not regenerated
    other = ensure_synthetic(tmp_path, **{**PARAMS, "images": 6})
    assert other != first and len(list((other / "train2017").glob("*.jpg"))) == 6
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(DataError, match="unknown synthetic parameter"):
        ensure_synthetic(tmp_path, colour="red")
    with pytest.raises(DataError, match="num_classes"):
        ensure_synthetic(tmp_path, num_classes=99)


def test_cli_data_synth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from accelcore.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "cli"), "--images", "3",
                 "--val-images", "1", "--size", "96", "--num-classes", "3"]) == 0
    assert f"written to {tmp_path / 'cli'}" in capsys.readouterr().out
    ds = COCODataset(tmp_path / "cli", "val2017", "instances_val2017.json")
    assert len(ds) == 1 and ds.num_classes == 3


def test_plugin_declares_and_builds(synth: Path, tmp_path: Path) -> None:
    decls = plugin.accelcore_declare()
    assert all(isinstance(d, Declaration) and d.kind == "data" for d in decls)
    assert {d.name for d in decls} == {"coco", "synthetic"}

    syn_cfg = SimpleNamespace(images=6, val_images=3, size=96, seed=1, num_classes=4,
                              cache_dir=str(tmp_path / "cache"))
    cfg = SimpleNamespace(root=None, train="train2017", val="val2017",
                          train_json="instances_train2017.json",
                          val_json="instances_val2017.json", cache=False, synthetic=syn_cfg)
    train = plugin.accelcore_build_data(cfg, "train", tmp_path)
    val = plugin.accelcore_build_data(cfg, "val", tmp_path)
    assert isinstance(train, COCODataset) and len(train) == 6 and len(val) == 3
    assert train.num_classes == 4 and train.class_names == val.class_names
    assert train.root == val.root and train.root.parent == tmp_path / "cache"

    coco_cfg = SimpleNamespace(root=str(synth), train="val2017", val="val2017",
                               train_json="instances_val2017.json",
                               val_json="instances_val2017.json", cache=True, synthetic=None)
    ds = plugin.accelcore_build_data(coco_cfg, "train", tmp_path)
    assert len(ds) == 4 and ds.root == synth
    with pytest.raises(DataError, match="unknown data split"):
        plugin.accelcore_build_data(coco_cfg, "test", tmp_path)
    with pytest.raises(DataError, match="dataset root not found"):
        plugin.accelcore_build_data(SimpleNamespace(root=str(tmp_path / "x")), "val", tmp_path)
