"""Intel Neural Compressor static int8 (``int8``)."""

from __future__ import annotations

import pytest
import torch
from inference_helpers import accelerate, corr, images, raw_model, rel_err, reload, request

pytest.importorskip("neural_compressor.torch")


def _check(model: torch.nn.Module, tmp_path) -> None:
    x = images()
    ref = model(x)
    acc = accelerate("int8", model, request(tmp_path))
    out = acc(x)
    assert acc.precision == "int8" and acc.details["calibration_images"] == 8
    assert acc.details["fp32_modules"]  # the predictor convs stayed float
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert corr(out, ref) > 0.98, corr(out, ref)
    assert rel_err(out, ref) > 1e-5  # really quantized, not the fp32 graph
    loaded = reload("int8", acc, tmp_path / "artifact")
    torch.testing.assert_close(loaded(x), out, rtol=1e-3, atol=1e-3)


def test_tiny(tmp_path):
    _check(raw_model(prefer_yolox=False), tmp_path)


@pytest.mark.slow
def test_yolox_nano(tmp_path):
    _check(raw_model(), tmp_path)
