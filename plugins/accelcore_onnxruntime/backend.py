"""ONNX export, quantization (static QOperator / dynamic integer) and the ORT session runner."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from accelcore.errors import BackendUnavailable
from accelcore.inference.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    deploy_form,
    export_onnx,
    exporter_of,
)
from accelcore.interfaces import AcceleratedModel, AccelerateRequest

MODEL_FILE = "model.onnx"


def accelerate(method: str, model: torch.nn.Module,
               request: AccelerateRequest) -> AcceleratedModel:
    options = request.options
    # 7-bit weights are ORT's remedy for U8S8 saturation on CPUs without VNNI. Measured on this
    # AVX2-only EPYC (yolox_nano): no accuracy gain for QOperator, a loss for integer ops — so
    # off by default, available as an option.
    reduce_range = bool(options.get("reduce_range", False))
    if method == "onnxruntime_int8_qlinear" and request.calibration is None:
        # Fail before the (slow) export.
        raise BackendUnavailable("onnxruntime_int8_qlinear: needs calibration data "
                                 "(AccelerateRequest.calibration is None)")
    details: dict[str, Any] = {"deploy_form": bool(options.get("deploy_form", True))}
    if details["deploy_form"]:  # the stem as one conv: ORT fp32 -19% on a Zen 3 (see README)
        model = deploy_form(model)
    with tempfile.TemporaryDirectory(prefix="accelcore-ort-") as tmp_name:
        tmp = Path(tmp_name)
        fp32 = export_onnx(model, tmp / "fp32.onnx", tuple(request.input_size), batch_size=2,
                           dynamic_batch=True, exporter=options.get("exporter", "auto"))
        details["exporter"] = exporter_of(fp32)
        if method == "onnxruntime_fp32":
            final = fp32
        else:
            prepared = _preprocess(fp32, tmp)
            details["reduce_range"] = reduce_range
            if method == "onnxruntime_int8_qlinear":
                final, calib = _quantize_static(prepared, tmp, request, reduce_range)
                details.update(calib)
            else:
                final = _quantize_dynamic(prepared, tmp, reduce_range)
        # Keep the bytes: the session and ``save`` need no file once the temp dir is gone.
        data = final.read_bytes()
    return _build(method, data, details)


def load(method: str, folder: Path, manifest: dict) -> AcceleratedModel:
    data = (folder / MODEL_FILE).read_bytes()
    return _build(method, data, {"loaded_from": str(folder)})


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    # quant_pre_process / calibration write scratch files into the working directory.
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _preprocess(fp32: Path, tmp: Path) -> Path:
    """ORT's recommended pre-quantization pass (shape inference + graph optimization)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = tmp / "prepared.onnx"
    with _cwd(tmp):
        # Symbolic shape inference fails on the symbolic batch dim of a dynamic-batch model.
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
    return out


class _Reader:
    """CalibrationDataReader over ``request.calibration()`` (one batch per ``get_next``)."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self._batches = iter(batches)
        self.batches = 0
        self.images = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().cpu().numpy()
        array = np.ascontiguousarray(batch, dtype=np.float32)
        self.batches += 1
        self.images += array.shape[0]
        return {INPUT_NAME: array}


def _quantize_static(prepared: Path, tmp: Path, request: AccelerateRequest,
                     reduce_range: bool) -> tuple[Path, dict]:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    reader = _Reader(request.calibration())
    # quantize_static checks isinstance(CalibrationDataReader): register our duck type.
    CalibrationDataReader.register(_Reader)
    out = tmp / "int8_qlinear.onnx"
    exclude = output_tail(prepared)
    with _cwd(tmp):
        quantize_static(
            str(prepared), str(out), reader,
            # The predictor convs and the concat/reshape after them stay fp32: quantized, their
            # outputs would share one 8-bit scale across box offsets and class logits.
            nodes_to_exclude=exclude,
            quant_format=QuantFormat.QOperator,
            # U8 activations + S8 weights: the fast MLAS path (S8S8 QDQ was ~4x slower here).
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            per_channel=True, reduce_range=reduce_range,
            calibrate_method=CalibrationMethod.MinMax,
        )
    if reader.batches == 0:
        raise BackendUnavailable("onnxruntime_int8_qlinear: the calibration iterator "
                                 "yielded no batch")
    return out, {"calibration_batches": reader.batches, "calibration_images": reader.images,
                 "fp32_output_nodes": len(exclude)}


def output_tail(path: Path) -> list[str]:
    """Names of the nodes between the last convolutions and the graph output, those convs
    included: everything reached walking back from the output until (and including) a Conv."""
    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    names: list[str] = []
    stack = [o.name for o in graph.output]
    seen: set[str] = set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        names.append(node.name)
        if node.op_type != "Conv":
            stack.extend(node.input)
    return names


def reference(name: str, model: torch.nn.Module, request: AccelerateRequest) -> AcceleratedModel:
    """``onnxruntime_plain_int8``: ONNX Runtime used as its quantization guide says — the same
    ONNX export, ``quant_pre_process``, ``quantize_static`` with every default (QDQ format,
    int8 activations and weights, MinMax calibration on the same images), and a session with
    default options. None of accelcore's choices (U8S8 QOperator, fp32 output convs, threads)."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    if request.calibration is None:
        raise BackendUnavailable(f"{name}: needs calibration data")
    with tempfile.TemporaryDirectory(prefix="accelcore-ort-plain-") as tmp_name:
        tmp = Path(tmp_name)
        fp32 = export_onnx(model, tmp / "fp32.onnx", tuple(request.input_size), batch_size=2,
                           dynamic_batch=True)
        prepared = _preprocess(fp32, tmp)
        reader = _Reader(request.calibration())
        CalibrationDataReader.register(_Reader)
        out = tmp / "int8.onnx"
        with _cwd(tmp):
            quantize_static(str(prepared), str(out), reader)
        data = out.read_bytes()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load_from_string(data).graph.node)

    def forward(images: Any) -> torch.Tensor:
        x = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x})[0])

    settings = {"quantize_static": "defaults (QDQ, QInt8/QInt8, MinMax)",
                "calibration_images": reader.images, "session_options": "defaults",
                "quantized_ops": {op: n for op, n in ops.items() if op in (
                    "QuantizeLinear", "DequantizeLinear")},
                "onnxruntime": ort.__version__}
    return AcceleratedModel(method=name, precision="int8", forward=forward, details=settings)


def _quantize_dynamic(prepared: Path, tmp: Path, reduce_range: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp / "int8_integer.onnx"
    with _cwd(tmp):
        quantize_dynamic(
            str(prepared), str(out),
            # ORT's CPU ConvInteger kernel only takes uint8 weights.
            weight_type=QuantType.QUInt8, per_channel=False, reduce_range=reduce_range,
            op_types_to_quantize=["Conv", "MatMul"],
        )
    return out


def _session(data: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Same thread budget as the rest of the process (torch), one op at a time.
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _build(method: str, data: bytes, details: dict) -> AcceleratedModel:
    from accelcore_onnxruntime import OnnxRuntimeBackend

    session = _session(data)
    ops = Counter(node.op_type for node in onnx.load_from_string(data).graph.node)
    conv_ops = {op: n for op, n in ops.items() if "Conv" in op or "MatMul" in op}

    def forward(images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        x = np.ascontiguousarray(images, dtype=np.float32)
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])

    def save(folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MODEL_FILE).write_bytes(data)

    info = {**details, "onnxruntime": ort.__version__, "conv_ops": conv_ops,
            "threads": torch.get_num_threads(), "model_bytes": len(data)}
    precision = OnnxRuntimeBackend.methods[method].compute
    return AcceleratedModel(method=method, precision=precision, forward=forward, save=save,
                            details=info)
