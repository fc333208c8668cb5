"""accelcore plugin: the YOLOX detector family (nano … x, plus custom depth/width).

Importing this package registers the models with :func:`accelcore.registry.register_model`; the
hook implementations below let the core discover and build them by name. Plain functions:
``accelcore_yolox.postprocess.postprocess`` (NMS), ``decode_outputs``, ``yolox_loss``,
``load_checkpoint``.
"""

from __future__ import annotations

from typing import Any

import pluggy

from accelcore.errors import RecipeError
from accelcore.interfaces import Declaration

from .checkpoint import load_checkpoint
from .loss import yolox_loss
from .models import YOLOX
from .postprocess import decode_outputs
from .zoo import CUSTOM_NAME, CUSTOM_SUMMARY, MODEL_NAMES, SPECS, build_yolox

hookimpl = pluggy.HookimplMarker("accelcore")

__all__ = [
    "YOLOX",
    "build_yolox",
    "decode_outputs",
    "hookimpl",
    "load_checkpoint",
    "yolox_loss",
]


@hookimpl
def accelcore_declare() -> list[Declaration]:
    decls = [
        Declaration(
            kind="model",
            name=name,
            summary=f"{s.summary} ({s.params_m}M params, {s.gflops} GFLOPs)",
        )
        for name, s in SPECS.items()
    ]
    decls.append(Declaration(kind="model", name=CUSTOM_NAME, summary=CUSTOM_SUMMARY))
    return decls


def _build(config: Any) -> YOLOX:
    name = config.name
    num_classes = getattr(config, "num_classes", None)
    num_classes = 80 if num_classes is None else int(num_classes)
    input_size = getattr(config, "input_size", None)
    depth = getattr(config, "depth", None)
    width = getattr(config, "width", None)
    depthwise = getattr(config, "depthwise", None)
    if name == CUSTOM_NAME:
        if depth is None or width is None:
            raise RecipeError(f"model '{CUSTOM_NAME}' needs model.depth and model.width")
        return build_yolox(
            name,
            float(depth),
            float(width),
            bool(depthwise),
            num_classes,
            tuple(input_size) if input_size else (640, 640),
        )
    spec = SPECS[name]
    # A fixed size cannot be reshaped silently: point to yolox_custom instead.
    for key, given, fixed in (
        ("depth", depth, spec.depth),
        ("width", width, spec.width),
        ("depthwise", depthwise, spec.depthwise),
    ):
        if given is not None and given != fixed:
            raise RecipeError(
                f"model '{name}' has {key}={fixed}, recipe sets model.{key}={given}; "
                f"use name '{CUSTOM_NAME}' for custom sizes"
            )
    return build_yolox(
        name,
        spec.depth,
        spec.width,
        spec.depthwise,
        num_classes,
        tuple(input_size) if input_size else spec.input_size,
    )


@hookimpl
def accelcore_build_model(config: Any) -> YOLOX | None:
    if getattr(config, "name", None) not in MODEL_NAMES:
        return None
    model = _build(config)
    checkpoint = getattr(config, "checkpoint", None)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, finetune=bool(getattr(config, "finetune", False)))
    return model
