"""Shared fixtures: paths to the repository, the optional coco128 data, and plugin isolation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def coco128_root() -> Path | None:
    """The real 128-image COCO subset, if this machine has it (never required)."""
    env = os.environ.get("ACCELCORE_COCO128")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "coco128"]:
        if (candidate / "annotations" / "instances_train2017.json").is_file():
            return candidate
    return None


@pytest.fixture
def coco128() -> Path:
    root = coco128_root()
    if root is None:
        pytest.skip("coco128 not found (set ACCELCORE_COCO128 or put it at ../shared/data/coco128)")
    return root


@pytest.fixture
def fresh_plugins():
    """A plugin manager reloaded from entry points before and after the test."""
    from accelcore.plugins import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def yolox_conv_offers(monkeypatch):
    """``train(form, dtype=None) -> (model, [(conv, offered), …])``: one yolox_nano training
    step (64 px, under CPU autocast to ``dtype`` if given), recording for every convolution that
    went through the measured choice whether form ``form`` was among its candidates."""
    import torch

    from accelcore import registry
    from accelcore.plugins import get_plugin_manager
    from accelcore.training import conv_forms

    def train(form: str, dtype=None):
        get_plugin_manager()
        offered = []
        real = conv_forms.conv2d
        monkeypatch.setattr(conv_forms, "conv2d", lambda conv, x: offered.append(
            (conv, form in conv_forms.forms(conv, x))) or real(conv, x))
        cl = torch.channels_last
        model = registry.create_model("yolox_nano", num_classes=3).train().to(memory_format=cl)
        images = (torch.rand(2, 3, 64, 64) * 255).contiguous(memory_format=cl)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            losses = model(images, torch.zeros(2, 4, 5))
        losses["total_loss"].backward()
        return model, offered

    return train
