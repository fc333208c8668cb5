"""Reference rows (the plain runtimes, measured beside the methods) and the lead over them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

REFERENCES = ["openvino_plain_int8", "openvino_plain_default", "onnxruntime_plain_int8",
              "torch_plain_fp32"]
ROW_KEYS = {"name", "runtime", "precision", "latency_ms", "img_per_s", "ap50_95", "settings"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from accelcore.data.coco import COCODataset
    from accelcore.data.synthetic import ensure_synthetic

    root = ensure_synthetic(tmp_path_factory.mktemp("syn"), images=4, val_images=4, size=96,
                            seed=0, num_classes=3)
    return (COCODataset(root, "val2017", "instances_val2017.json"),
            COCODataset(root, "train2017", "instances_train2017.json"))


def _recipe(references, **accelerate):
    from accelcore.config import load_recipe

    acc = {"methods": ["original"], "batch_size": 2, "calibration_images": 4, "save": "none",
           "references": references,
           "latency": {"warmup": 1, "min_runs": 2, "min_seconds": 0.0}, **accelerate}
    return load_recipe(data={"model": {"num_classes": 3, "input_size": [64, 64]},
                             "accelerate": acc})


def test_every_declared_reference_runs_on_a_tiny_model(data, tmp_path, fresh_plugins):
    from accelcore import create_model
    from accelcore.inference.accelerate import run_accelerate
    from accelcore.plugins import get_plugin_manager

    pm = get_plugin_manager()
    assert set(REFERENCES) <= set(pm.names("reference"))
    val, calib = data
    res = run_accelerate(_recipe(["auto"]), create_model("yolox_nano", num_classes=3),
                         tmp_path, val, calib, pm, isolate=False)
    refs = {r["name"]: r for r in res["references"]}
    assert set(REFERENCES) <= set(refs)
    for name in REFERENCES:
        row = refs[name]
        assert row["status"] == "ok", (name, row["reason"])
        assert ROW_KEYS <= set(row) and row["latency_ms"] > 0 and row["img_per_s"] > 0
        assert 0.0 <= row["ap50_95"] <= 1.0 and row["runtime"]
    assert refs["openvino_plain_int8"]["precision"] == "int8"
    assert refs["openvino_plain_int8"]["settings"]["requests"] in \
        refs["openvino_plain_int8"]["settings"]["trial_ms"]
    assert "QuantizeLinear" in refs["onnxruntime_plain_int8"]["settings"]["quantized_ops"]
    assert res["selected"] == "original"
    lead = res["lead"]
    assert lead["selected"] == "original" and lead["ratio"] is not None
    best = min((r for r in res["references"] if r.get("accuracy_drop") is not None
                and r["accuracy_drop"] <= 1.0), key=lambda r: r["latency_ms"])
    assert lead["best_reference"] == best["name"]
    assert lead["ratio"] == pytest.approx(best["latency_ms"] / res["methods"][0]["latency_ms"])


def test_lead_ignores_references_outside_the_accuracy_budget():
    from accelcore.inference.accelerate import compute_lead

    rows = [{"method": "original", "latency_ms": 100.0, "ap50_95": 0.50},
            {"method": "fast", "latency_ms": 20.0, "ap50_95": 0.496}]
    refs = [{"name": "inaccurate", "status": "ok", "latency_ms": 10.0, "ap50_95": 0.40},
            {"name": "accurate", "status": "ok", "latency_ms": 30.0, "ap50_95": 0.498},
            {"name": "broken", "status": "failed", "latency_ms": None, "ap50_95": None}]
    criterion = SimpleNamespace(metric="ap50_95", kind="absolute", max_drop=1.0)
    lead = compute_lead(rows, refs, "fast", criterion)
    assert lead["best_reference"] == "accurate" and lead["ratio"] == pytest.approx(1.5)
    assert refs[1]["speedup"] == pytest.approx(100 / 30)
    assert compute_lead(rows, refs[:1], "fast", criterion)["ratio"] is None


def test_unknown_reference_is_a_one_line_error(fresh_plugins):
    from accelcore.errors import PluginError
    from accelcore.inference.accelerate import reference_names
    from accelcore.plugins import get_plugin_manager

    with pytest.raises(PluginError, match=r"accelerate.references\[0\]: unknown reference "
                                          r"'openvino_plain_int9' \(did you mean"):
        reference_names(["openvino_plain_int9"], get_plugin_manager())


def test_report_shows_references_and_lead(tmp_path):
    from accelcore_reports import accelcore_report

    results = {"recipe": "r", "batch_size": 2, "input_size": [64, 64], "selected": "m",
               "accuracy_criterion": {"metric": "ap50_95", "kind": "absolute", "max_drop": 1.0},
               "methods": [{"method": "original", "status": "ok", "latency_ms": 10.0,
                            "speedup": 1.0, "ap50_95": 0.5},
                           {"method": "m", "status": "ok", "latency_ms": 4.0, "speedup": 2.5,
                            "ap50_95": 0.499}],
               "references": [{"name": "plain_x", "status": "ok", "latency_ms": 6.0,
                               "speedup": 10 / 6, "ap50_95": 0.497, "runtime": "glibc (stock)",
                               "settings": {"requests": "batch-1 requests"}}],
               "lead": {"selected": "m", "selected_latency_ms": 4.0,
                        "best_reference": "plain_x", "best_reference_latency_ms": 6.0,
                        "ratio": 1.5}}
    written = accelcore_report(results=results, run_dir=tmp_path, formats=["md", "png"])
    text = (tmp_path / "report.md").read_text()
    assert "| plain_x | ok | 6.0 |" in text and "requests=batch-1 requests" in text
    assert "= **1.50x**" in text
    assert (tmp_path / "report.png") in written and (tmp_path / "report.png").stat().st_size


@pytest.mark.slow
def test_stock_reference_runs_untuned_beside_tuned_methods(data, tmp_path, fresh_plugins):
    from accelcore import create_model
    from accelcore.inference.accelerate import run_accelerate
    from accelcore.plugins import get_plugin_manager

    val, calib = data
    res = run_accelerate(_recipe(["torch_plain_fp32"]), create_model("yolox_nano", num_classes=3),
                         tmp_path, val, calib, get_plugin_manager())
    ref = res["references"][0]
    assert ref["status"] == "ok" and ref["runtime"].startswith("glibc (stock)")
    assert ref["runtime_setup"]["malloc_tuning"] is False
    assert res["methods"][0]["runtime"]["allocator"] == "glibc (tuned)"
