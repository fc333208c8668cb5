"""OpenVINO backend: fp32 / bf16 (honest about the CPU) / int8 (NNCF), sync and async runners."""

from __future__ import annotations

import pytest
import torch
from inference_helpers import accelerate, images, raw_model, rel_err, reload, request

from accelcore.errors import BackendUnavailable

pytest.importorskip("openvino", reason="openvino not installed (pip install 'accelcore[openvino]')")

# fp32 differs from eager only by kernel summation order.
FP32_TOL = 1e-4
BF16_TOL = 5e-2


def channel_corr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst Pearson correlation over output channels that vary (a constant channel — e.g. an
    untrained class logit — would make a global correlation trivially ~1)."""
    out, ref = out.reshape(-1, out.shape[-1]), ref.reshape(-1, ref.shape[-1])
    worst = 1.0
    for c in range(ref.shape[1]):
        if ref[:, c].std() > 1e-6:
            pair = torch.stack((out[:, c], ref[:, c]))
            worst = min(worst, float(torch.corrcoef(pair)[0, 1]))
    return worst


def int8_model() -> torch.nn.Module:
    """raw_model() with Kaiming-initialised convs and random BN affine parameters, so the head
    logits vary over a range like a trained net's. With default init they vary by ~1e-2 around
    their bias, below any 8-bit step, and a correlation test would measure the init, not the
    quantizer. (BN statistics measured on images instead make the random net chaotic: tiny
    perturbations grow layer by layer, and even a correct int8 model decorrelates.)"""
    model = raw_model()
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.0)
            m.bias.data.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def model():
    return raw_model()


@pytest.fixture(scope="module")
def tiny():
    # Runner / precision-reporting tests do not depend on the architecture: the tiny net
    # converts in ~1 s instead of ~10-30 s on 2 shared cores.
    return raw_model(prefer_yolox=False)


@pytest.fixture(scope="module")
def fp32(model, tmp_path_factory):
    return accelerate("openvino_fp32", model, request(tmp_path_factory.mktemp("ov")))


def test_declared_available():
    from accelcore_openvino import plugin

    decls = {d.name: d for d in plugin.accelcore_declare()}
    assert set(decls) == {"openvino_fp32", "openvino_bf16", "openvino_int8",
                          "openvino_plain_int8", "openvino_plain_default"}
    assert all(d.available and d.summary for d in decls.values())
    assert {n for n, d in decls.items() if d.kind == "reference"} == {
        "openvino_plain_int8", "openvino_plain_default"}


def test_fp32_close_to_eager_and_dynamic_batch(model, fp32):
    for n in (2, 3, 1):  # export example was 2: any batch must work
        x = images(n, seed=n)
        out, ref = fp32(x), model(x)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert rel_err(out, ref) < FP32_TOL
    d = fp32.details
    assert fp32.precision == "fp32"
    assert d["precision_hint"] == "f32" and d["effective_inference_precision"] == "f32"
    assert d["request_batch"] in (1, 2) and set(d["request_batch_trials_ms"]) == {"1", "2"}
    assert d["conv_runtime_precisions"].get("f32", 0) > 0


def test_fp32_save_load_round_trip(fp32, tmp_path):
    x = images(3, seed=7)
    loaded = reload("openvino_fp32", fp32, tmp_path / "artifact")
    assert (tmp_path / "artifact" / "model.xml").is_file()
    assert (tmp_path / "artifact" / "model.bin").is_file()
    # fp32 weights kept (ov.save_model would compress to fp16 by default): bit-identical graph.
    torch.testing.assert_close(loaded(x), fp32(x), rtol=1e-6, atol=1e-6)


def test_tuned_request_batch_uint8_input_and_round_trip(tiny, tmp_path):
    """The per-request batch is measured at conversion and travels with the artifact; the
    uint8 NHWC input gives the float model's output for the same (integer) pixels."""
    from accelcore.inference.image_format import UINT8_NHWC, to_format

    req = request(tmp_path)
    req.batch_size = 8
    req.options["streams"] = 2
    acc = accelerate("openvino_fp32", tiny, req)
    assert acc.input_format == UINT8_NHWC and acc.details["streams"] == 2
    trials = acc.details["request_batch_trials_ms"]
    assert set(trials) == {"1", "2", "4", "8"} and all(ms > 0 for ms in trials.values())
    # The fastest one (trials are reported rounded to 0.1 ms: ties are possible).
    assert trials[str(acc.details["request_batch"])] == min(trials.values())
    for n in (5, 1):  # uneven split (the last request is padded); a single image
        x = images(n, seed=n).round()
        assert rel_err(acc(x), tiny(x)) < FP32_TOL  # float in: converted by __call__
        native = to_format(x, UINT8_NHWC)
        assert rel_err(acc.forward(native), tiny(x)) < FP32_TOL
    loaded = reload("openvino_fp32", acc, tmp_path / "artifact")
    assert loaded.details["request_batch"] == acc.details["request_batch"]
    assert loaded.input_format == UINT8_NHWC


def test_fixed_request_batch_and_float_input_options(tiny, tmp_path):
    req = request(tmp_path)
    req.options.update(request_batch=3, input_format="float32_nchw", deploy_form=False)
    acc = accelerate("openvino_fp32", tiny, req)
    assert acc.details["request_batch"] == 3 and acc.input_format == "float32_nchw"
    assert "request_batch_trials_ms" not in acc.details and acc.details["deploy_form"] is False
    x = images(4)
    assert rel_err(acc.forward(x), tiny(x)) < FP32_TOL


def test_bf16_reports_what_runs(tiny, tmp_path):
    import openvino as ov

    native = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    acc = accelerate("openvino_bf16", tiny, request(tmp_path))
    x = images()
    out, ref = acc(x), tiny(x)
    assert acc.details["precision_hint"] == "bf16"
    if native:
        assert acc.precision == "bf16" and rel_err(out, ref) < BF16_TOL
    else:  # OpenVINO accepts the hint but keeps f32: the method must say so
        assert acc.precision == "fp32"
        assert acc.details["effective_inference_precision"] == "f32"
        assert "no native bf16" in acc.details["note"]
        assert rel_err(out, ref) < FP32_TOL


@pytest.mark.slow
def test_int8_nncf_close_and_round_trip(tmp_path):
    model = int8_model()
    acc = accelerate("openvino_int8", model, request(tmp_path, calib_images=8))
    assert acc.precision == "int8"
    assert acc.details["calibration_images"] == 8 and acc.details["nncf_preset"] == "mixed"
    assert acc.details["conv_runtime_precisions"].get("u8", 0) + \
        acc.details["conv_runtime_precisions"].get("i8", 0) > 0  # really int8 kernels
    x = images(2, seed=11)
    out, ref = acc(x), model(x)
    assert channel_corr(out, ref) > 0.98  # measured 0.994
    assert rel_err(out, ref) > 1e-5  # quantized: not bit-identical to fp32
    loaded = reload("openvino_int8", acc, tmp_path / "artifact")
    assert loaded.precision == "int8"
    torch.testing.assert_close(loaded(x), out, rtol=1e-5, atol=1e-5)


def test_int8_without_calibration_is_unavailable(model, tmp_path):
    req = request(tmp_path)
    req.calibration = None
    with pytest.raises(BackendUnavailable, match="needs calibration data"):
        accelerate("openvino_int8", model, req)


def test_missing_openvino_is_reported(monkeypatch, model, tmp_path):
    import importlib.util

    import accelcore_openvino

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else real(name, *a))
    plugin = accelcore_openvino.plugin
    decl = {d.name: d for d in plugin.accelcore_declare()}["openvino_fp32"]
    assert not decl.available and "openvino not installed" in decl.reason
    with pytest.raises(BackendUnavailable, match="openvino_fp32: openvino not installed"):
        plugin.accelcore_accelerate("openvino_fp32", model, request(tmp_path))
    assert plugin.accelcore_accelerate("not_mine", model, request(tmp_path)) is None


def _signal_stack_is_mapped() -> bool:
    import ctypes

    from accelcore_openvino.signal_stack import SignalStack

    stack = SignalStack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) == 0
    if stack.ss_flags & 2:  # SS_DISABLE: no alternate stack, nothing can dangle
        return True
    with open("/proc/self/maps") as maps:
        ranges = [[int(a, 16) for a in line.split()[0].split("-")] for line in maps]
    return any(lo <= stack.ss_sp < hi for lo, hi in ranges) and stack.ss_size >= 64 << 10


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="/proc, glibc")
def test_released_runners_leave_a_valid_signal_stack():
    """OpenVINO restores a freed alternate signal stack when compiled models are released out of
    order; a SIGCHLD on that thread then crashed the process (it killed our CI run)."""
    import gc

    import openvino as ov
    from accelcore_openvino.backend import OpenVINORunner

    model = ov.convert_model(torch.nn.Conv2d(3, 4, 3), example_input=torch.zeros(1, 3, 8, 8))
    first = OpenVINORunner(model, "f32", request_batch=1)
    second = OpenVINORunner(model, "f32", request_batch=2)
    assert _signal_stack_is_mapped()
    del first
    gc.collect()
    assert _signal_stack_is_mapped()
    del second
    gc.collect()
    assert _signal_stack_is_mapped()
