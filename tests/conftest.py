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
