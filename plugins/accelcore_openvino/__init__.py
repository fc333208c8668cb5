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

from dataclasses import dataclass

from accelcore.backend import Backend, Method, Reference


@dataclass(frozen=True)
class OpenVINOMethod(Method):
    hint: str = "f32"  # INFERENCE_PRECISION_HINT


class OpenVINOBackend(Backend):
    methods = {
        "openvino_fp32": OpenVINOMethod(
            "OpenVINO CPU runtime, INFERENCE_PRECISION_HINT=f32 set explicitly", "fp32",
            hint="f32"),
        "openvino_bf16": OpenVINOMethod(
            "OpenVINO CPU runtime, INFERENCE_PRECISION_HINT=bf16 (needs a CPU with native "
            "bf16; otherwise OpenVINO runs f32, see details)", "bf16", hint="bf16"),
        "openvino_int8": OpenVINOMethod(
            "OpenVINO + NNCF post-training int8 (mixed preset, calibrated on real images); "
            "non-quantized ops in f32", "int8", requires=("nncf",), hint="f32"),
    }
    references = {
        "openvino_plain_int8": Reference(
            "OpenVINO used directly: convert_model, nncf.quantize with its defaults on the same "
            "calibration images, THROUGHPUT hint, parallel infer requests (benchmark_app's way)",
            "int8", requires=("nncf",)),
        "openvino_plain_default": Reference(
            "OpenVINO used directly: convert_model, OpenVINO's default precision, THROUGHPUT "
            "hint, parallel infer requests", "fp32"),
    }
    requires = ("openvino",)
    install = "pip install 'accelcore[openvino]'"
    packages = ("openvino", "nncf")
    runtime = "accelcore_openvino.backend"


plugin = OpenVINOBackend()
