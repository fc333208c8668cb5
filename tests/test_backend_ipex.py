"""IPEX backend and the ``ipex`` training feature (``train.features: [ipex]``).

Unmarked tests run everywhere and check the honest-unavailable path of the main environment
(torch 2.13, where IPEX must never be imported). Tests marked ``ipex`` need the IPEX environment
(``scripts/make_ipex_env.sh``; run ``.venv-ipex/bin/python -m pytest -m ipex
tests/test_backend_ipex.py``) and skip with the reason elsewhere.
"""

from __future__ import annotations

import sys

import accelcore_ipex
import pytest
import torch
from inference_helpers import accelerate, images, raw_model, rel_err, reload, request

from accelcore.config import TrainConfig
from accelcore.errors import BackendUnavailable, PluginError, RecipeError

REASON = accelcore_ipex.ipex_status()
PLUGIN = accelcore_ipex.plugin
ipex_only = pytest.mark.skipif(bool(REASON), reason=f"IPEX cannot run here: {REASON}")
main_env_only = pytest.mark.skipif(not REASON, reason="IPEX is usable in this environment")
METHODS = ["fp32_ipex", "bf16_ipex", "jit_fp32_ipex", "jit_fp32_ipex_channels_last"]
FP32_TOL = 1e-4
BF16_TOL = 5e-2


# -- main environment: declared unavailable with the precise reason, never imported
@main_env_only
def test_declared_unavailable_with_reason():
    decls = {d.name: d for d in PLUGIN.accelcore_declare()}
    assert set(decls) == {*METHODS, "ipex"}
    assert decls.pop("ipex").kind == "feature"  # a training feature, not an inference method
    for decl in decls.values():
        assert decl.kind == "backend" and not decl.available and decl.reason == REASON
    if REASON.startswith("IPEX "):  # installed next to the wrong torch
        assert f"found {torch.__version__.split('+')[0]}" in REASON
    else:
        assert "intel-extension-for-pytorch not installed" in REASON
    assert "intel_extension_for_pytorch" not in sys.modules  # importing it would exit


def test_reason_names_the_versions(monkeypatch):
    import importlib.metadata

    versions = {"intel-extension-for-pytorch": "2.8.0+cpu", "torch": "2.13.0+cpu"}

    def fake_version(name: str) -> str:
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", fake_version)
    assert accelcore_ipex.ipex_status() == "IPEX 2.8.0 needs torch 2.8.*, found 2.13.0"
    versions["torch"] = "2.8.0+cu128"
    assert accelcore_ipex.ipex_status() == ""
    del versions["intel-extension-for-pytorch"]
    assert "not installed" in accelcore_ipex.ipex_status()


@main_env_only
@pytest.mark.parametrize("method", METHODS)
def test_accelerate_raises_unavailable(method, tmp_path):
    with pytest.raises(BackendUnavailable, match=f"{method}: .*(not installed|needs torch)"):
        PLUGIN.accelcore_accelerate(method, raw_model(), request(tmp_path))
    with pytest.raises(BackendUnavailable):
        PLUGIN.accelcore_load_artifact(method, tmp_path, {})
    assert "intel_extension_for_pytorch" not in sys.modules


@main_env_only
@pytest.mark.parametrize("precision", ["32", "bf16"])
def test_ipex_training_points_to_stock_pytorch(precision):
    model = raw_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    config = TrainConfig(features=["ipex"], precision=precision)
    with pytest.raises(BackendUnavailable) as info:
        PLUGIN.accelcore_prepare_training(model, optimizer, config)
    message = str(info.value)
    assert message.startswith("train.features: ipex: ") and REASON in message
    assert "train.compile: true" in message and "train.precision: bf16" in message
    assert "\n" not in message
    feature = {d.name: d for d in PLUGIN.accelcore_declare()}["ipex"]
    assert not feature.available and REASON in feature.reason
    assert "train.compile: true" in feature.reason


@pytest.mark.parametrize(("flags", "noted"), [("avx2 fma", True), ("avx512f amx_bf16", False)])
def test_stock_path_hint_is_honest_about_bf16_hardware(monkeypatch, flags, noted):
    monkeypatch.setenv("ACCELCORE_CPU_FLAGS", flags)
    message = accelcore_ipex.unavailable_training("IPEX is missing")
    assert message.startswith("IPEX is missing; use train.compile: true")
    assert ("no bf16 hardware" in message) == noted


def test_training_hook_ignores_configs_without_the_feature():
    model = raw_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    assert PLUGIN.accelcore_prepare_training(model, optimizer, TrainConfig()) is None
    assert PLUGIN.accelcore_accelerate("openvino_fp32", model, None) is None
    assert PLUGIN.accelcore_load_artifact("openvino_fp32", "/nowhere", {}) is None


def test_ipex_options_are_rejected():
    model = raw_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    config = TrainConfig(features=["ipex"], options={"ipex": {"level": "O1"}})
    with pytest.raises(RecipeError, match=r"train\.options\.ipex: .*takes no options"):
        PLUGIN.accelcore_prepare_training(model, optimizer, config)


def test_use_ipex_is_not_an_inference_method():
    from accelcore.inference.accelerate import resolve_methods
    from accelcore.plugins import get_plugin_manager

    pm = get_plugin_manager()
    assert "use_ipex" not in pm.names("backend") and "ipex" in pm.names("feature")
    with pytest.raises(PluginError, match=r"accelerate\.methods\[0\]: unknown backend 'use_ipex'"):
        resolve_methods(["use_ipex"], pm)


# -- the IPEX environment: real IPEX
@pytest.fixture(scope="module")
def model():
    return raw_model()


@pytest.mark.ipex
@ipex_only
@pytest.mark.parametrize("method", ["fp32_ipex", "jit_fp32_ipex", "jit_fp32_ipex_channels_last"])
def test_fp32_methods_close_and_round_trip(method, model, tmp_path):
    acc = accelerate(method, model, request(tmp_path))
    assert acc.precision == "fp32" and acc.details["ipex"].startswith("2.8")
    for n in (2, 3):
        x = images(n, seed=n)
        out, ref = acc(x), model(x)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert rel_err(out, ref) < FP32_TOL
    x = images(3, seed=9)
    loaded = reload(method, acc, tmp_path / "artifact")
    torch.testing.assert_close(loaded(x), acc(x), rtol=1e-5, atol=1e-5)


@pytest.mark.ipex
@ipex_only
def test_bf16_runs_or_says_why(model, tmp_path):
    reason = accelcore_ipex.bf16_status()
    decl = {d.name: d for d in PLUGIN.accelcore_declare()}["bf16_ipex"]
    assert decl.available == (not reason) and decl.reason == reason
    if reason:  # e.g. AVX2-only CPUs: IPEX refuses bf16 weight prepack
        with pytest.raises(BackendUnavailable, match="bf16_ipex: .*avx512bw"):
            accelerate("bf16_ipex", model, request(tmp_path))
        return
    acc = accelerate("bf16_ipex", model, request(tmp_path))
    x = images()
    out, ref = acc(x), model(x)
    assert acc.precision == "bf16" and out.dtype == torch.float32
    assert 1e-6 < rel_err(out, ref) < BF16_TOL


@pytest.mark.ipex
@ipex_only
def test_ipex_training_steps():
    from accelcore import create_model

    torch.manual_seed(0)
    model = create_model("yolox_nano", num_classes=3)
    model.output_mode = "raw"
    probe = images(2, size=(64, 64), seed=5)
    with torch.no_grad():
        before = model.eval()(probe)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model, optimizer = PLUGIN.accelcore_prepare_training(
        model, optimizer, TrainConfig(features=["ipex"], precision="32"))
    assert model.training
    x = images(2, size=(64, 64))
    targets = torch.zeros(2, 4, 5)
    targets[:, 0] = torch.tensor([1.0, 32.0, 32.0, 20.0, 16.0])
    for _ in range(2):
        loss = model(x, targets)["total_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    with torch.no_grad():
        after = model.eval()(probe)
    assert rel_err(after, before) > 1e-3  # the IPEX optimizer really updated the weights
    if accelcore_ipex.bf16_status():
        with pytest.raises(BackendUnavailable, match="train.features: ipex: .*avx512bw"):
            PLUGIN.accelcore_prepare_training(
                model, optimizer, TrainConfig(features=["ipex"], precision="bf16"))

