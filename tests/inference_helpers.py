"""Shared helpers for the inference/backend tests (a helper module: no tests here).

Backends are tested on ``yolox_nano`` (3 classes) at a small input when the YOLOX plugin is
importable, else on a tiny conv net with the same raw-output contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from accelcore import hookimpl
from accelcore.interfaces import AcceleratedModel, AccelerateRequest, Declaration

SIZE = (96, 96)
BATCH = 2
NUM_CLASSES = 3


class TinyRawNet(nn.Module):
    """A small detector-shaped net: images [B,3,H,W] 0-255 -> raw [B, N, 5 + C]."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.SiLU(),
            nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.SiLU(),
            nn.Conv2d(32, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.SiLU())
        self.reg, self.obj = nn.Conv2d(32, 4, 1), nn.Conv2d(32, 1, 1)
        self.cls = nn.Conv2d(32, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(x / 255.0)
        return torch.cat([self.reg(f), self.obj(f), self.cls(f)], 1).flatten(2).permute(0, 2, 1)


def raw_model(prefer_yolox: bool = True) -> nn.Module:
    """Eval-mode raw-output model; BN statistics randomised (fresh ones are the identity)."""
    torch.manual_seed(0)
    model: nn.Module | None = None
    if prefer_yolox:
        try:
            from accelcore import create_model

            model = create_model("yolox_nano", num_classes=NUM_CLASSES)
            model.output_mode = "raw"
        except Exception:  # YOLOX plugin not importable: same contract, smaller net
            model = None
    model = model or TinyRawNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval().requires_grad_(False)


def images(n: int = BATCH, size: tuple[int, int] = SIZE, seed: int = 0) -> torch.Tensor:
    """Image-like input: smooth blobs of integer pixel values 0-255 (as decoded images have,
    so the uint8 input of graph backends sees exactly the same pixels)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size[0] // 8, size[1] // 8, generator=gen) * 255
    smooth = torch.nn.functional.interpolate(low, size=size, mode="bilinear",
                                             align_corners=False)
    return smooth.round()


def request(tmp_path: Path, calib_images: int = 8) -> AccelerateRequest:
    from accelcore.inference.calibration import calibration_from_tensor

    return AccelerateRequest(batch_size=BATCH, input_size=SIZE, work_dir=tmp_path,
                             calibration=calibration_from_tensor(images(calib_images, seed=3), 4))


def accelerate(method: str, model: nn.Module, req: AccelerateRequest) -> AcceleratedModel:
    import copy

    from accelcore.plugins import get_plugin_manager

    out = get_plugin_manager().hook.accelcore_accelerate(method=method,
                                                        model=copy.deepcopy(model), request=req)
    assert out is not None, f"no plugin converted {method}"
    return out


def reload(method: str, acc: AcceleratedModel, folder: Path) -> AcceleratedModel:
    """Save with the method's own save and load through the accelcore_load_artifact hook."""
    from accelcore.plugins import get_plugin_manager

    folder.mkdir(parents=True, exist_ok=True)
    acc.save(folder)
    loaded = get_plugin_manager().hook.accelcore_load_artifact(
        method=method, folder=folder,
        manifest={"input_size": list(SIZE), "method": method, "details": acc.details})
    assert loaded is not None
    return loaded


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack((a.flatten(), b.flatten())))[0, 1])


# -- a plugin with broken methods, for the failure paths (also loadable as --plugin module)
@hookimpl
def accelcore_declare() -> list[Declaration]:
    return [Declaration("backend", "test_raises", "raises during conversion"),
            Declaration("backend", "test_crashes", "kills its process (segfault)"),
            Declaration("backend", "test_missing", "never available", available=False,
                        reason="needs a library nobody has")]


@hookimpl
def accelcore_accelerate(method: str, model: Any, request: AccelerateRequest) -> Any:
    if method == "test_raises":
        raise RuntimeError("deliberate conversion failure\nsecond line")
    if method == "test_crashes":
        import os
        import signal

        os.kill(os.getpid(), signal.SIGSEGV)
    return None
