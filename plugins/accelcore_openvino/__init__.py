"""OpenVINO backend plugin: ``openvino_fp32``, ``openvino_bf16``, ``openvino_int8`` (NNCF PTQ).

Declaration is cheap (``find_spec`` only); OpenVINO and NNCF are imported in
:mod:`accelcore_openvino.backend` when a method is actually built or loaded.

Options read from ``AccelerateRequest.options`` (per method, ``accelerate.options``):

- ``request_batch`` ("auto" or an int, default "auto"): images per infer request; a batch runs
  as parallel requests on the THROUGHPUT streams. "auto" measures 1, 2, 4, 8, 16 and one
  request per stream on this machine at conversion time and keeps the fastest (saved with
  the artifact, so loading does not re-tune).
- ``streams`` (int): CPU streams (default: OpenVINO's choice for THROUGHPUT).
- ``input_format`` ("uint8_nhwc", default, or "float32_nchw"): the artifact takes decoded
  uint8 images; conversion and layout change run inside the graph.
- ``deploy_form`` (default true): convert the model's exactly-equivalent graph form
  (``Detector.deploy_form``; YOLOX: the Focus stem as one convolution).
- int8 only: ``preset`` ("mixed" default, or "performance"), ``fp32_output_convs`` (default
  true), ``float_hint`` ("auto" default: bf16 for the float layers where the CPU has native
  bf16, else f32; or "f32" / "bf16").
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
            "OpenVINO + NNCF post-training int8 (mixed preset, calibrated on real images, "
            "predictor convs float); float layers in bf16 where native, else f32",
            "int8", requires=("nncf",), hint="f32"),
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
