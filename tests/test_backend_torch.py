"""Eager PyTorch methods: original / bf16 / bf16_channels_last."""

from __future__ import annotations

import pytest
import torch
from inference_helpers import SIZE, accelerate, images, raw_model, rel_err, reload, request

# fp32 must match eager to float rounding; bf16 keeps ~8 mantissa bits per op.
TOL = {"original": 1e-5, "bf16": 5e-2, "bf16_channels_last": 5e-2}


@pytest.fixture(scope="module")
def model():
    return raw_model()


@pytest.fixture(scope="module")
def tiny():
    # bf16 is emulated (slow) on CPUs without AVX512-BF16/AMX: fast tests use the tiny net.
    return raw_model(prefer_yolox=False)


@pytest.mark.parametrize("method", ["original", "bf16", "bf16_channels_last"])
def test_output_close_to_fp32(method, tiny, tmp_path):
    _check_close(method, tiny, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["original", "bf16", "bf16_channels_last"])
def test_output_close_to_fp32_yolox(method, model, tmp_path):
    _check_close(method, model, tmp_path)


def _check_close(method, model, tmp_path):
    x = images()
    ref = model(x)
    acc = accelerate(method, model, request(tmp_path))
    out = acc(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert acc.precision == ("fp32" if method == "original" else "bf16")
    assert rel_err(out, ref) < TOL[method]
    if method != "original":  # really ran in bf16: not bit-identical to fp32
        assert rel_err(out, ref) > 1e-6


@pytest.mark.parametrize("method", ["original", "bf16_channels_last"])
def test_save_load_round_trip(method, tiny, tmp_path):
    x = images(3)  # another batch size than the export example: the batch dim is dynamic
    acc = accelerate(method, tiny, request(tmp_path))
    loaded = reload(method, acc, tmp_path / "artifact")
    assert (tmp_path / "artifact" / "model.pt2").is_file()
    torch.testing.assert_close(loaded(x), acc(x), rtol=1e-4, atol=1e-4)


def test_load_artifact_predicts_in_original_coordinates(model, tmp_path):
    """save_artifact + accelcore.load: LoadedModel.predict maps boxes to the source image."""
    import numpy as np

    import accelcore
    from accelcore.inference.artifact import save_artifact

    if not hasattr(model, "decode"):
        pytest.skip("needs the YOLOX plugin (decode/postprocess)")
    acc = accelerate("original", model, request(tmp_path))
    folder = save_artifact(tmp_path / "art", acc, {
        "input_size": list(SIZE), "batch_size": 2,
        "model": {"name": "yolox_nano", "num_classes": 3}, "class_names": ["a", "b", "c"]})
    loaded = accelcore.load(folder)
    assert loaded.method == "original" and loaded.class_names == ["a", "b", "c"]
    big = np.ascontiguousarray(images(1, size=(192, 192), seed=5)[0].permute(1, 2, 0)
                               .numpy().astype(np.uint8))
    dets = loaded.predict([big, big[:96, :150].copy()], conf=1e-6, nms=0.65)
    assert len(dets) == 2 and dets[0].shape[1] == 6 and len(dets[0]) > 0
    # By hand: letterbox 192 -> 96 (ratio 0.5), forward, decode, NMS, then boxes x 2.
    from accelcore.data.preprocess import preprocess_batch

    batch, ratios = preprocess_batch([big], SIZE)
    assert ratios == [0.5]
    # Same forward as predict (eager vs exported differ in the last bits, and near-tied
    # scores of an untrained model would reorder).
    manual = model.postprocess(model.decode(loaded.forward(batch), SIZE), 1e-6, 0.65)[0]
    expected = manual.copy()
    expected[:, :4] *= 2
    # Order-free comparison: an untrained model gives many exactly tied scores.
    np.testing.assert_allclose(_sorted(dets[0]), _sorted(expected), rtol=1e-4, atol=1e-3)


def _sorted(dets):
    import numpy as np

    keys = np.round(dets, 2)
    return dets[np.lexsort(keys.T[::-1])]
