"""accelcore plugin: the YOLOX detector family (nano … x, plus custom depth/width).

The hooks below are the only way the core finds these models: ``accelcore_declare`` names them,
``accelcore_build_model`` builds them (a :class:`YOLOX` implements
:class:`accelcore.interfaces.Detector`), ``accelcore_checkpoint_info`` tells what an official or
accelcore ``.pth`` was made for. Plain functions: ``accelcore_yolox.postprocess.postprocess``
(NMS), ``decode_outputs``, ``yolox_loss``, ``load_checkpoint``.
"""

from __future__ import annotations

from typing import Any

from accelcore import hookimpl
from accelcore.errors import RecipeError
from accelcore.interfaces import Declaration

from .checkpoint import checkpoint_num_classes, extract_state_dict, load_checkpoint
from .loss import yolox_loss
from .models import YOLOX
from .postprocess import decode_outputs
from .zoo import CUSTOM_NAME, CUSTOM_SUMMARY, MODEL_NAMES, SPECS, build_yolox

#: What a recipe without model.name trains: the smallest model, the one CPUs train in minutes.
DEFAULT_MODEL = "yolox_nano"


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
            default=name == DEFAULT_MODEL,
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
    options = dict(getattr(config, "options", None) or {})
    unknown = sorted(set(options) - {"depth", "width", "depthwise"})
    if unknown:
        raise RecipeError(f"model.options: unknown option(s) {', '.join(unknown)} for "
                          f"model '{name}'; allowed: depth, width, depthwise")
    depth, width = options.get("depth"), options.get("width")
    depthwise = options.get("depthwise")
    if name == CUSTOM_NAME:
        if depth is None or width is None:
            raise RecipeError(f"model '{CUSTOM_NAME}' needs model.options.depth and "
                              "model.options.width")
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
                f"model '{name}' has {key}={fixed}, recipe sets model.options.{key}={given}; "
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


@hookimpl
def accelcore_checkpoint_info(checkpoint: Any) -> dict | None:
    """Name/class count/input size of a YOLOX checkpoint (accelcore's, official or a bare
    state_dict); ``None`` for checkpoints of other models."""
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    if meta.get("name") is not None and meta["name"] not in MODEL_NAMES:
        return None  # another model plugin's checkpoint
    try:
        state, _ = extract_state_dict(checkpoint)
    except ValueError:
        return None
    num_classes = checkpoint_num_classes(state)
    if num_classes is None:
        return None  # no YOLOX class-prediction layer: not a YOLOX checkpoint
    info = {k: meta[k] for k in ("name", "input_size") if meta.get(k) is not None}
    info["num_classes"] = num_classes
    return info
