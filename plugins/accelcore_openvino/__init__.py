"""OpenVINO backend plugin: ``openvino_fp32``, ``openvino_bf16``, ``openvino_int8`` (NNCF PTQ).

Declaration is cheap (``find_spec`` only); OpenVINO and NNCF are imported in
:mod:`accelcore_openvino.backend` when a method is actually built or loaded.

Options read from ``AccelerateRequest.options``:

- ``async`` (true / false / "auto", default "auto" = async for a request batch size >= 4, see
  ``backend.AUTO_ASYNC_MIN_BATCH`` for the measurements): compile with the THROUGHPUT hint and
  run a batch as parallel infer requests (one per stream, the batch split between them) instead
  of one synchronous request with the LATENCY hint.
- ``streams`` (int): CPU streams in async mode (default: OpenVINO's choice for THROUGHPUT).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pluggy

from accelcore.inference.lazy_backend import LazyBackend
from accelcore.interfaces import AcceleratedModel, AccelerateRequest, Declaration

hookimpl = pluggy.HookimplMarker("accelcore")

#: method -> (OpenVINO INFERENCE_PRECISION_HINT, summary)
METHODS: dict[str, tuple[str, str]] = {
    "openvino_fp32": ("f32", "OpenVINO CPU runtime, INFERENCE_PRECISION_HINT=f32 set explicitly"),
    "openvino_bf16": ("bf16", "OpenVINO CPU runtime, INFERENCE_PRECISION_HINT=bf16 (needs a "
                              "CPU with native bf16; otherwise OpenVINO runs f32, see details)"),
    "openvino_int8": ("f32", "OpenVINO + NNCF post-training int8 (mixed preset, calibrated on "
                             "real images); non-quantized ops in f32"),
}


def _missing(method: str) -> str:
    """Why ``method`` cannot run here ('' if it can), from package presence only."""
    if importlib.util.find_spec("openvino") is None:
        return "openvino not installed (pip install 'accelcore[openvino]')"
    if method == "openvino_int8" and importlib.util.find_spec("nncf") is None:
        return "nncf not installed (pip install 'accelcore[openvino]')"
    return ""


BACKEND = LazyBackend({m: s for m, (_, s) in METHODS.items()}, _missing,
                      "accelcore_openvino.backend")


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
