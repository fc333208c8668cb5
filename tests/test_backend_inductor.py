"""torch.compile methods: inductor_fp32 / inductor_bf16 / inductor_int8.

Fast tests use the tiny net (inductor compiles yolox_nano in minutes on 2 shared cores); the
yolox_nano variants are marked slow.
"""

from __future__ import annotations

import pytest
import torch
from inference_helpers import (
    accelerate,
    corr,
    images,
    raw_model,
    rel_err,
    reload,
    request,
)

TOL = {"inductor_fp32": 1e-4, "inductor_bf16": 5e-2}


def _check(method: str, model: torch.nn.Module, tmp_path) -> None:
    x = images()
    ref = model(x)
    acc = accelerate(method, model, request(tmp_path))
    out = acc(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    if method == "inductor_int8":
        assert acc.precision == "int8"
        assert acc.details["calibration_images"] == 8
        assert acc.details["fp32_modules"]  # the predictor convs stayed float
        # int8: a close but not exact copy of the fp32 output.
        assert corr(out, ref) > 0.98, corr(out, ref)
        assert rel_err(out, ref) > 1e-5  # really quantized
    else:
        assert rel_err(out, ref) < TOL[method], rel_err(out, ref)
    assert acc.details["compiled"]["mode"] == "aot"  # built ahead of time, for this CPU
    loaded = reload(method, acc, tmp_path / "artifact")
    assert loaded.details["compiled"]["mode"] == "aot"
    torch.testing.assert_close(loaded(x), out, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["inductor_fp32", "inductor_int8"])
def test_tiny(method, tmp_path):
    _check(method, raw_model(prefer_yolox=False), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["inductor_fp32", "inductor_bf16", "inductor_int8"])
def test_yolox_nano(method, tmp_path):
    _check(method, raw_model(), tmp_path)


def test_int8_needs_calibration(tmp_path):
    req = request(tmp_path)
    req.calibration = None
    with pytest.raises(ValueError, match="calibration"):
        accelerate("inductor_int8", raw_model(prefer_yolox=False), req)


def _conv_inputs_dequantized(module: torch.nn.Module) -> dict[str, bool]:
    """Module name of every conv in a converted PT2E graph -> is its weight dequantized int8?"""
    from accelcore.inference.pt2e import _CONV_TARGETS, _module_path

    found = {}
    for node in module.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith(_CONV_TARGETS):
            weight = node.args[1]
            found[_module_path(node)] = "dequantize" in str(getattr(weight, "target", ""))
    return found


def test_output_convs_stay_float_and_the_rest_is_int8():
    from accelcore.inference.calibration import calibration_from_tensor
    from accelcore.inference.export import example_input
    from accelcore.inference.pt2e import export_raw, output_tail_modules, quantize_pt2e

    model = raw_model(prefer_yolox=False)
    assert output_tail_modules(export_raw(model, example_input((32, 32)))) == ["cls", "obj", "reg"]
    calib = calibration_from_tensor(images(8, (32, 32)), batch_size=4)
    converted, details = quantize_pt2e(model, example_input((32, 32)), calib)
    assert details["fp32_modules"] == ["cls", "obj", "reg"] and details["calibration_images"] == 8
    dequantized = _conv_inputs_dequantized(converted)
    assert dequantized == {"body.0": True, "body.3": True, "body.6": True,
                           "cls": False, "obj": False, "reg": False}
    converted, details = quantize_pt2e(model, example_input((32, 32)), calib,
                                       fp32_output_convs=False, observer="histogram")
    assert details["fp32_modules"] == [] and "histogram" in details["activations"]
    assert all(_conv_inputs_dequantized(converted).values())
    with pytest.raises(ValueError, match="observer"):
        quantize_pt2e(model, example_input((32, 32)), calib, observer="percentile")


@pytest.mark.slow
def test_yolox_output_tail_is_the_nine_predictor_convs():
    from accelcore.inference.export import example_input
    from accelcore.inference.pt2e import export_raw, output_tail_modules

    names = output_tail_modules(export_raw(raw_model(), example_input((64, 64))))
    assert names == sorted(f"head.{kind}_preds.{k}" for kind in ("cls", "obj", "reg")
                           for k in range(3))


def test_channels_last_option_is_used_and_kept_by_the_artifact(tmp_path):
    model = raw_model(prefer_yolox=False)
    req = request(tmp_path)
    req.options = {"channels_last": True}
    acc = accelerate("inductor_fp32", model, req)
    assert acc.details["channels_last"] is True
    x = images()
    assert rel_err(acc(x), model(x)) < TOL["inductor_fp32"]
    loaded = reload("inductor_fp32", acc, tmp_path / "artifact")
    assert loaded.details["channels_last"] is True
    torch.testing.assert_close(loaded(x), acc(x), rtol=1e-3, atol=1e-3)
