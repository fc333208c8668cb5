"""torch.compile methods: inductor_fp32 / inductor_bf16 / inductor_int8.

Fast tests use the tiny net (inductor compiles yolox_nano in minutes on 2 shared cores); the
yolox_nano variants are marked slow.
"""

from __future__ import annotations

import pytest
import torch
from test_inference_support import (
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
        # int8: a close but not exact copy of the fp32 output.
        assert corr(out, ref) > 0.98, corr(out, ref)
        assert rel_err(out, ref) > 1e-5  # really quantized
    else:
        assert rel_err(out, ref) < TOL[method], rel_err(out, ref)
    loaded = reload(method, acc, tmp_path / "artifact")
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
