"""The accelerate stage: rows, failure paths, selection, artifacts; then reports and predict."""

from __future__ import annotations

import json
from pathlib import Path

import inference_helpers as support
import pytest


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from accelcore.data.coco import COCODataset
    from accelcore.data.synthetic import ensure_synthetic

    root = ensure_synthetic(tmp_path_factory.mktemp("syn"), images=6, val_images=6, size=128,
                            seed=0, num_classes=3)
    return (COCODataset(root, "val2017", "instances_val2017.json"),
            COCODataset(root, "train2017", "instances_train2017.json"))


@pytest.fixture
def pm(fresh_plugins):
    from accelcore.plugins import get_plugin_manager

    manager = get_plugin_manager()
    manager.register(support, name="inference_helpers")
    manager._declared = None
    return manager


def _recipe(methods, **accelerate):
    from accelcore.config import load_recipe

    acc = {"methods": methods, "batch_size": 2, "calibration_images": 4, "save": "best",
           "latency": {"warmup": 1, "min_runs": 2, "min_seconds": 0.05}, **accelerate}
    return load_recipe(data={"model": {"num_classes": 3, "input_size": [96, 96]},
                             "plugins": ["inference_helpers"], "accelerate": acc})


def _model():
    from accelcore import create_model

    return create_model("yolox_nano", num_classes=3)


def test_failed_and_unavailable_methods_do_not_stop_the_run(pm, data, tmp_path):
    from accelcore.inference.accelerate import run_accelerate

    val, calib = data
    recipe = _recipe(["test_raises", "jit_fp32", "test_missing"])
    res = run_accelerate(recipe, _model(), tmp_path, val, calib, pm, isolate=False)
    rows = {r["method"]: r for r in res["methods"]}
    assert [r["method"] for r in res["methods"]] == [
        "original", "test_raises", "jit_fp32", "test_missing"]  # baseline added first
    assert rows["test_raises"]["status"] == "failed"
    assert rows["test_raises"]["reason"] == "convert: RuntimeError: deliberate conversion failure"
    assert rows["test_missing"]["status"] == "unavailable"
    assert "nobody has" in rows["test_missing"]["reason"]
    for name in ("original", "jit_fp32"):
        row = rows[name]
        assert row["status"] == "ok", row
        for key in ("latency_ms", "p10_ms", "p90_ms", "img_per_s", "speedup", "ap50_95", "ap50",
                    "convert_s", "size_mb"):
            assert row[key] is not None, (name, key)
    assert rows["original"]["speedup"] == 1.0 and rows["jit_fp32"]["precision"] == "fp32"
    assert res["batch_size"] == 2 and res["input_size"] == [96, 96]
    assert "avx512f" in res["machine"]["flags"] and "torch" in res["versions"]
    # Untrained model: every AP is 0, so the criterion holds for both; the faster one wins.
    fastest = min(("original", "jit_fp32"), key=lambda m: rows[m]["latency_ms"])
    assert res["selected"] == fastest
    art = tmp_path / "artifacts" / fastest
    assert set(res["artifacts"]) == {fastest} and (art / "manifest.json").is_file()
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["method"] == fastest and manifest["model"]["num_classes"] == 3
    assert manifest["input_size"] == [96, 96] and "ap50_95" in manifest["metrics"]
    assert not (tmp_path / "accelerate" / "staging").exists()

    # Reports from the same results: every format written, table printed.
    written = pm.hook.accelcore_report(results=res, run_dir=tmp_path, formats=["md", "json",
                                                                                "png"])
    paths = {Path(p).name for group in written for p in group}
    assert paths == {"report.md", "report.json", "report.png"}
    md = (tmp_path / "report.md").read_text()
    assert "| test_raises | failed |" in md and "deliberate conversion failure" in md
    assert json.loads((tmp_path / "report.json").read_text())["selected"] == fastest

    # accelcore predict on the saved artifact: annotated image + COCO-style json.
    import cv2

    from accelcore.cli import main

    src = tmp_path / "src"
    src.mkdir()
    img = val[0][0]
    cv2.imwrite(str(src / "a.jpg"), img)
    assert main(["predict", "--model", str(art), "--source", str(src), "--out",
                 str(tmp_path / "pred"), "--conf", "0.0"]) == 0
    assert (tmp_path / "pred" / "a.jpg").is_file()
    dets = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert dets and set(dets[0]) == {"image", "bbox", "score", "category_id", "category"}


def test_unknown_method_is_a_clear_error(pm, data, tmp_path):
    from accelcore.errors import PluginError
    from accelcore.inference.accelerate import run_accelerate

    val, calib = data
    with pytest.raises(PluginError, match=r"accelerate.methods\[0\]: unknown backend "
                                          r"'inductor_fp23' \(did you mean 'inductor_fp32'"):
        run_accelerate(_recipe(["inductor_fp23"]), _model(), tmp_path, val, calib, pm,
                       isolate=False)


@pytest.mark.slow
def test_isolated_processes_survive_a_crash(pm, data, tmp_path):
    """Default mode: one spawn process per method; a segfault becomes a failed row."""
    from accelcore.inference.accelerate import run_accelerate

    val, calib = data
    res = run_accelerate(_recipe(["test_crashes", "jit_fp32"], save="all"), _model(), tmp_path,
                         val, calib, pm)
    rows = {r["method"]: r for r in res["methods"]}
    assert rows["test_crashes"]["status"] == "failed"
    assert "signal 11" in rows["test_crashes"]["reason"]
    assert rows["original"]["status"] == "ok" and rows["jit_fp32"]["status"] == "ok"
    assert set(res["artifacts"]) == {"original", "jit_fp32"}
