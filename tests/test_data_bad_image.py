"""``data.on_bad_image``: an unreadable training image stops training (fail, the default) or is
replaced deterministically by the next readable one with one warning per file (skip)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from accelcore.data.coco import COCODataset
from accelcore.data.loader import build_train_loader
from accelcore.data.mosaic import MosaicDetection
from accelcore.errors import DataError, ImageReadError, RecipeError

SIZE = (64, 64)


def write_dataset(root: Path, count: int, bad: dict[int, bytes]) -> Path:
    """``count`` images, each a flat grey (distinct per image) with one box; the indices in
    ``bad`` get those bytes instead of a PNG."""
    (root / "train2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, anns = [], []
    for i in range(count):
        name = f"{i:03d}.png"
        path = root / "train2017" / name
        if i in bad:
            path.write_bytes(bad[i])
        else:
            cv2.imwrite(str(path), np.full((48, 64, 3), 10 + 20 * i, np.uint8))
        images.append({"id": i + 1, "file_name": name, "height": 48, "width": 64})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1,
                     "bbox": [8.0, 8.0, 20.0, 16.0], "iscrowd": 0, "area": 320.0})
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "thing"}]}))
    return root


def wrap(dataset, on_bad_image: str) -> MosaicDetection:
    # No mosaic, so item i is image i (plus its seeded flip/HSV): replacements are visible.
    return MosaicDetection(dataset, SIZE, mosaic=False, on_bad_image=on_bad_image)


@pytest.fixture()
def dataset(tmp_path: Path) -> COCODataset:
    return COCODataset(write_dataset(tmp_path / "ds", 6, {2: b"garbage bytes", 3: b"\x89PNG"}))


def test_fail_is_the_default_and_names_the_file(dataset: COCODataset) -> None:
    wrapped = MosaicDetection(dataset, SIZE, mosaic=False)
    assert wrapped.on_bad_image == "fail"
    wrapped[(1, 7, False)]  # a good one loads
    with pytest.raises(ImageReadError, match=r"cannot decode image .*002\.png \(image id 3\)"):
        wrapped[(2, 7, False)]


def test_skip_replaces_with_the_next_readable_image(dataset: COCODataset, caplog) -> None:
    wrapped = wrap(dataset, "skip")
    with caplog.at_level(logging.WARNING, logger="accelcore.data.mosaic"):
        first = wrapped[(2, 7, False)]
        again = wrapped[(3, 7, False)]
        wrapped[(2, 9, False)]
    replacement = wrap(dataset, "skip")[(4, 7, False)]
    # 2 and 3 are unreadable: both become index 4, with the same augmentation for the same seed.
    for a, b in ((first, replacement), (again, replacement)):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert a[3] == b[3] == 5  # image id of index 4
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # once per file, however often it is met
    assert "002.png" in messages[0] and "003.png" in messages[1]


def test_skip_wraps_around_and_all_bad_is_an_error(tmp_path: Path) -> None:
    ds = COCODataset(write_dataset(tmp_path / "wrap", 3, {2: b"x"}))
    assert wrap(ds, "skip")[(2, 1, False)][3] == 1  # last index -> first
    broken = COCODataset(write_dataset(tmp_path / "all", 2, {0: b"x", 1: b"y"}))
    with pytest.raises(DataError, match="no image of the 2 in the dataset can be read"):
        wrap(broken, "skip")[(0, 1, False)]


def test_training_loader_with_mosaic_skip_and_fail(dataset: COCODataset) -> None:
    skipping = build_train_loader(MosaicDetection(dataset, SIZE, on_bad_image="skip"),
                                  batch_size=2, num_workers=0, seed=3)
    images = [x for x, _ in skipping]
    assert len(images) == 3 and images[0].shape == (2, *SIZE, 3)
    assert all(x.dtype == torch.uint8 for x in images)
    failing = build_train_loader(MosaicDetection(dataset, SIZE, on_bad_image="fail"),
                                 batch_size=2, num_workers=0, seed=3)
    with pytest.raises(ImageReadError, match=r"00[23]\.png"):
        for _ in failing:
            pass


def test_recipe_key_reaches_the_training_loader(dataset: COCODataset) -> None:
    from accelcore.config import load_recipe
    from accelcore.training.loop import build_train_loader as loop_loader

    recipe = load_recipe(data={"data": {"on_bad_image": "skip", "num_workers": 0},
                               "train": {"batch_size": 2}})
    assert recipe.data.on_bad_image == "skip"
    loader = loop_loader(dataset, recipe, SIZE, rank=0, world_size=1)
    assert loader.dataset.on_bad_image == "skip"
    assert sum(1 for _ in loader) == 3
    assert load_recipe(data={}).data.on_bad_image == "fail"
    with pytest.raises(RecipeError, match=r"data.on_bad_image: 'ignore' is not allowed.*skip"):
        load_recipe(data={"data": {"on_bad_image": "ignore"}})


def test_image_read_error_survives_pickling() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(ImageReadError("cannot read image /x.png: gone", "/x.png")))
    assert isinstance(err, ImageReadError) and err.path == "/x.png"
    assert str(err) == "cannot read image /x.png: gone"
