"""ONNX Runtime backend plugin: fp32, static int8 (QOperator) and dynamic int8 (integer ops).

- ``onnxruntime_fp32``: the exported ONNX graph, all graph optimizations.
- ``onnxruntime_int8_qlinear``: static post-training quantization, QOperator format
  (QLinearConv …), U8 activations + S8 per-channel weights, calibrated on real images.
- ``onnxruntime_int8_integer``: dynamic quantization (ConvInteger / MatMulInteger); activation
  ranges are computed per batch at run time, so no calibration data is needed.

Options read from ``AccelerateRequest.options``: ``deploy_form`` (default true: export the
model's exactly-equivalent graph form, ``Detector.deploy_form``), ``exporter`` ("auto" |
"dynamo" | "legacy", see :mod:`accelcore.inference.export`), ``reduce_range`` (bool, default
off: 7-bit weights against U8S8 saturation on CPUs without VNNI; no gain on an AVX2 EPYC).
ONNX Runtime and onnx are imported in :mod:`accelcore_onnxruntime.backend`, on first use.
"""

from __future__ import annotations

from accelcore.backend import Backend, Method, Reference


class OnnxRuntimeBackend(Backend):
    methods = {
        "onnxruntime_fp32": Method(
            "ONNX Runtime CPU, fp32 ONNX graph (dynamo export), all optimizations", "fp32"),
        "onnxruntime_int8_qlinear": Method(
            "ONNX Runtime static int8, QOperator (QLinearConv), U8 activations + S8 per-channel "
            "weights, calibrated on real images", "int8"),
        "onnxruntime_int8_integer": Method(
            "ONNX Runtime dynamic int8 (ConvInteger/MatMulInteger), activation ranges computed "
            "per batch", "int8"),
    }
    references = {
        "onnxruntime_plain_int8": Reference(
            "ONNX Runtime used directly: quant_pre_process + quantize_static with its defaults "
            "on the same calibration images, default session options", "int8"),
    }
    # onnxscript (dynamo exporter) is optional: without it the export falls back to legacy.
    requires = ("onnxruntime", "onnx")
    install = "pip install 'accelcore[onnx]'"
    packages = ("onnx", "onnxruntime")
    runtime = "accelcore_onnxruntime.backend"


plugin = OnnxRuntimeBackend()
