"""ONNX export helper and the ONNX Runtime backend (fp32, static QOperator int8, dynamic int8)."""

from __future__ import annotations

import os

import pytest
import torch
from inference_helpers import SIZE, accelerate, images, raw_model, rel_err, reload, request
from test_backend_openvino import channel_corr, int8_model

from accelcore.errors import BackendUnavailable

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
onnx = pytest.importorskip("onnx", reason="onnx not installed")

FP32_TOL = 1e-4
INT8_MIN_CORR = 0.97  # worst varying channel; measured 0.988 (qlinear), 0.992 (integer)


@pytest.fixture(scope="module")
def model():
    return raw_model()


@pytest.fixture(scope="module")
def fp32(model, tmp_path_factory):
    # The legacy exporter keeps this fast test fast (~2 s vs ~20-40 s for the dynamo export on
    # 2 shared cores); the default (dynamo) path is covered by the slow int8 tests.
    req = request(tmp_path_factory.mktemp("ort"))
    req.options["exporter"] = "legacy"
    return accelerate("onnxruntime_fp32", model, req)


def test_export_legacy_dynamic_batch(model, tmp_path):
    from accelcore.inference.export import export_onnx, exporter_of

    path = export_onnx(model, tmp_path / "m.onnx", SIZE, exporter="legacy")
    assert exporter_of(path) == "legacy"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and out.name == "raw" and isinstance(inp.shape[0], str)
    for n in (1, 3):
        x = images(n, seed=n)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        assert rel_err(got, model(x)) < FP32_TOL


def test_export_rejects_batch_one_example(model, tmp_path):
    from accelcore.inference.export import export_onnx

    with pytest.raises(ValueError, match="batch_size >= 2"):
        export_onnx(model, tmp_path / "m.onnx", SIZE, batch_size=1)


def test_fp32_close_to_eager(model, fp32):
    assert fp32.precision == "fp32"
    d = fp32.details
    assert d["exporter"] == "legacy"  # as asked in the options
    assert d["conv_ops"].get("Conv", 0) > 0 and d["threads"] == torch.get_num_threads()
    for n in (2, 3, 1):
        x = images(n, seed=n)
        out, ref = fp32(x), model(x)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert rel_err(out, ref) < FP32_TOL


def test_fp32_save_load_round_trip(fp32, tmp_path):
    x = images(3, seed=4)
    loaded = reload("onnxruntime_fp32", fp32, tmp_path / "artifact")
    assert (tmp_path / "artifact" / "model.onnx").is_file()
    torch.testing.assert_close(loaded(x), fp32(x), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method, op", [("onnxruntime_int8_qlinear", "QLinearConv"),
                                        ("onnxruntime_int8_integer", "ConvInteger")])
def test_int8_close_and_round_trip(method, op, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # any scratch file the quantizer leaves would land here
    model = int8_model()
    acc = accelerate(method, model, request(tmp_path / "work", calib_images=8))
    assert acc.precision == "int8"
    assert acc.details["exporter"] == "dynamo"  # the default exporter
    ops = acc.details["conv_ops"]
    if op == "QLinearConv":
        assert acc.details["calibration_images"] == 8
        # only the head's predictor convs (3 levels x reg/obj/cls) stay fp32
        assert ops.get("Conv", 0) == 9
        assert ops[op] > 100
    else:
        assert ops.get(op, 0) > 100 and "Conv" not in ops
    x = images(2, seed=11)
    out, ref = acc(x), model(x)
    assert channel_corr(out, ref) > INT8_MIN_CORR
    assert rel_err(out, ref) > 1e-5  # really quantized
    loaded = reload(method, acc, tmp_path / "artifact")
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".onnx")]  # no litter in cwd


def test_qlinear_without_calibration_is_unavailable(model, tmp_path):
    req = request(tmp_path)
    req.calibration = None
    with pytest.raises(BackendUnavailable, match="needs calibration data"):
        accelerate("onnxruntime_int8_qlinear", model, req)


def test_missing_onnxruntime_is_reported(monkeypatch, model, tmp_path):
    import importlib.util

    import accelcore_onnxruntime

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    plugin = accelcore_onnxruntime.plugin
    decls = {d.name: d for d in plugin.accelcore_declare()}
    assert set(decls) == {"onnxruntime_fp32", "onnxruntime_int8_qlinear",
                          "onnxruntime_int8_integer", "onnxruntime_plain_int8"}
    assert not decls["onnxruntime_fp32"].available
    assert not decls["onnxruntime_plain_int8"].available  # the reference row says why too
    assert "onnxruntime not installed" in decls["onnxruntime_fp32"].reason
    with pytest.raises(BackendUnavailable, match="onnxruntime not installed"):
        plugin.accelcore_accelerate("onnxruntime_int8_integer", model, request(tmp_path))
    with pytest.raises(BackendUnavailable, match="onnxruntime not installed"):
        plugin.accelcore_load_artifact("onnxruntime_fp32", tmp_path, {})
    assert plugin.accelcore_accelerate("openvino_fp32", model, request(tmp_path)) is None
