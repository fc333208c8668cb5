"""ONNX Runtime backend plugin: fp32, static int8 (QOperator) and dynamic int8 (integer ops).

- ``onnxruntime_fp32``: the exported ONNX graph, all graph optimizations.
- ``onnxruntime_int8_qlinear``: static post-training quantization, QOperator format
  (QLinearConv …), U8 activations + S8 per-channel weights, calibrated on real images.
- ``onnxruntime_int8_integer``: dynamic quantization (ConvInteger / MatMulInteger); activation
  ranges are computed per batch at run time, so no calibration data is needed.

Options read from ``AccelerateRequest.options``: ``exporter`` ("auto" | "dynamo" | "legacy",
see :mod:`accelcore.inference.export`), ``reduce_range`` (bool, default off: 7-bit weights
against U8S8 saturation on CPUs without VNNI; measured no gain on this AVX2 EPYC).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pluggy

from accelcore.inference.lazy_backend import LazyBackend
from accelcore.interfaces import AcceleratedModel, AccelerateRequest, Declaration

hookimpl = pluggy.HookimplMarker("accelcore")

METHODS: dict[str, str] = {
    "onnxruntime_fp32": "ONNX Runtime CPU, fp32 ONNX graph (dynamo export), all optimizations",
    "onnxruntime_int8_qlinear": "ONNX Runtime static int8, QOperator (QLinearConv), U8 activations"
                                " + S8 per-channel weights, calibrated on real images",
    "onnxruntime_int8_integer": "ONNX Runtime dynamic int8 (ConvInteger/MatMulInteger), "
                                "activation ranges computed per batch",
}


def _missing(method: str) -> str:
    # onnxscript (dynamo exporter) is optional: without it the export falls back to legacy.
    for module in ("onnxruntime", "onnx"):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed (pip install 'accelcore[onnx]')"
    return ""


BACKEND = LazyBackend(METHODS, _missing, "accelcore_onnxruntime.backend")


@hookimpl
def accelcore_declare() -> list[Declaration]:
    return BACKEND.declarations()


@hookimpl
def accelcore_accelerate(method: str, model: Any,
                         request: AccelerateRequest) -> AcceleratedModel | None:
    return BACKEND.accelerate(method, model, request)


@hookimpl
def accelcore_load_artifact(method: str, folder: Path, manifest: dict) -> AcceleratedModel | None:
    return BACKEND.load(method, folder)
