"""YOLOX sizes (official model zoo) and a custom depth/width variant, built by name through
the plugin's ``accelcore_build_model`` hook."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from accelcore.errors import RecipeError

from .models import YOLOPAFPN, YOLOX, YOLOXHead

STRIDES = (8, 16, 32)
IN_CHANNELS = (256, 512, 1024)
PRIOR_PROB = 1e-2


@dataclass(frozen=True)
class YoloxSpec:
    depth: float
    width: float
    depthwise: bool
    input_size: tuple[int, int]
    params_m: float  # official zoo figures (80 classes), checked by the tests
    gflops: float
    summary: str


SPECS: dict[str, YoloxSpec] = {
    "yolox_nano": YoloxSpec(
        0.33, 0.25, True, (416, 416), 0.91, 1.08, "YOLOX-Nano (depthwise), 416"
    ),
    "yolox_tiny": YoloxSpec(0.33, 0.375, False, (416, 416), 5.06, 6.45, "YOLOX-Tiny, 416"),
    "yolox_s": YoloxSpec(0.33, 0.50, False, (640, 640), 9.0, 26.8, "YOLOX-S, 640"),
    "yolox_m": YoloxSpec(0.67, 0.75, False, (640, 640), 25.3, 73.8, "YOLOX-M, 640"),
    "yolox_l": YoloxSpec(1.0, 1.0, False, (640, 640), 54.2, 155.6, "YOLOX-L, 640"),
    "yolox_x": YoloxSpec(1.33, 1.25, False, (640, 640), 99.1, 281.9, "YOLOX-X, 640"),
}
CUSTOM_NAME = "yolox_custom"
CUSTOM_SUMMARY = "YOLOX with custom depth/width/depthwise (default input 640)"
MODEL_NAMES = (*SPECS, CUSTOM_NAME)


def build_yolox(
    name: str,
    depth: float,
    width: float,
    depthwise: bool = False,
    num_classes: int = 80,
    input_size: Sequence[int] = (640, 640),
    act: str = "silu",
) -> YOLOX:
    """Build a YOLOX the way the official Exp does (BN eps/momentum, prior-prob bias init)."""
    if int(num_classes) < 1:
        raise RecipeError(f"{name}: num_classes must be >= 1, got {num_classes}")
    if depth <= 0 or width <= 0:
        raise RecipeError(f"{name}: depth and width must be > 0, got {depth} and {width}")
    if len(input_size) != 2 or any(int(v) <= 0 or int(v) % 32 for v in input_size):
        # The PAN neck concatenates upsampled stride-32 maps with stride-16 ones.
        raise RecipeError(
            f"{name}: input_size must be [H, W], multiples of 32, got {list(input_size)}"
        )
    backbone = YOLOPAFPN(depth, width, in_channels=IN_CHANNELS, depthwise=depthwise, act=act)
    head = YOLOXHead(
        int(num_classes),
        width,
        strides=STRIDES,
        in_channels=IN_CHANNELS,
        act=act,
        depthwise=depthwise,
    )
    head.initialize_biases(PRIOR_PROB)
    meta = {
        "name": name,
        "num_classes": int(num_classes),
        "input_size": (int(input_size[0]), int(input_size[1])),
        "strides": STRIDES,
        "depth": depth,
        "width": width,
        "depthwise": depthwise,
    }
    return YOLOX(backbone, head, meta=meta)

