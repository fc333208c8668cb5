"""OpenVINO conversion, NNCF quantization, compilation and the sync / async runners."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch

from accelcore.errors import BackendUnavailable
from accelcore.inference.export import INPUT_NAME, OUTPUT_NAME, example_input
from accelcore.interfaces import AcceleratedModel, AccelerateRequest
from accelcore_openvino.signal_stack import ensure_signal_stack

#: Batches at least this large run async by default (option ``async``: true / false / "auto").
#: Measured on this 2-core EPYC, yolox_nano 416 px fp32, interleaved runs (cores shared, load
#: ~6): bs1 sync 63 ms vs async 76 ms; bs8 sync 633 vs async (2 streams) 509; bs16 sync 811 vs
#: async 686-710 ms median. Async wins ~1.15-1.25x once a batch can be split (BACKEND-FACTS saw
#: 1.16x at bs64 on the Sapphire Rapids box) and loses for a single image, which would run on
#: one stream with half the threads.
AUTO_ASYNC_MIN_BATCH = 4
MODEL_XML = "model.xml"
SETTINGS_JSON = "openvino.json"
PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def accelerate(method: str, model: torch.nn.Module,
               request: AccelerateRequest) -> AcceleratedModel:
    from accelcore_openvino import OpenVINOBackend

    if method == "openvino_int8" and request.calibration is None:
        # Fail before the conversion.
        raise BackendUnavailable("openvino_int8: needs calibration data "
                                 "(AccelerateRequest.calibration is None)")
    # At least 2 images, so the traced graph keeps the batch dimension symbolic.
    ov_model = to_openvino(model, example_input(request.input_size, min(request.batch_size, 4)))
    details: dict[str, Any] = {}
    if method == "openvino_int8":
        ov_model, details = _quantize(ov_model, request)
        ensure_signal_stack()  # NNCF compiled and released models of its own
    use_async = request.options.get("async", "auto")
    if use_async == "auto":
        use_async = request.batch_size >= AUTO_ASYNC_MIN_BATCH
    settings = {
        "hint": OpenVINOBackend.methods[method].hint,
        "async": bool(use_async),
        "streams": request.options.get("streams"),
    }
    return _build(method, ov_model, settings, details)


def load(method: str, folder: Path, manifest: dict) -> AcceleratedModel:
    settings = json.loads((folder / SETTINGS_JSON).read_text())
    ov_model = ov.Core().read_model(folder / MODEL_XML)
    return _build(method, ov_model, settings, {"loaded_from": str(folder)})


def reference(name: str, model: torch.nn.Module, request: AccelerateRequest) -> AcceleratedModel:
    """The plain-OpenVINO reference rows (:mod:`accelcore_openvino.reference`)."""
    from accelcore_openvino.reference import build

    return build(name, model, request, quantize=name == "openvino_plain_int8")


def to_openvino(model: torch.nn.Module, example: torch.Tensor,
                dynamic_batch: bool = True) -> Any:
    """Convert a raw-output torch model to an ``openvino.Model`` (direct from torch, no ONNX).

    With ``dynamic_batch`` the input is declared ``[?, 3, H, W]`` so one compiled model serves
    any batch size and a batch can be split across parallel infer requests.
    """
    model = model.eval()
    shape = [-1 if dynamic_batch else example.shape[0], *example.shape[1:]]
    with torch.no_grad():
        # Trace ourselves: convert_model's own trace re-runs the model to check the trace,
        # which doubled conversion time (yolox_nano 96 px: ~17 s -> ~8 s on 2 busy cores).
        traced = torch.jit.trace(model, example, check_trace=False)
        ov_model = ov.convert_model(traced, example_input=example,
                                    input=[ov.PartialShape(shape)])
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    ov_model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    return ov_model


def _quantize(ov_model: Any, request: AccelerateRequest) -> tuple[Any, dict]:
    """NNCF post-training quantization on real calibration batches (mixed preset)."""
    import nncf

    assert request.calibration is not None  # checked in accelerate()
    batches = [_as_numpy(batch) for batch in request.calibration()]
    if not batches:
        raise BackendUnavailable("openvino_int8: the calibration iterator yielded no batch")
    # Mixed: symmetric weights, asymmetric activations — the activations after SiLU are not
    # centred on zero, so asymmetric ranges keep more resolution there.
    quantized = nncf.quantize(
        ov_model, nncf.Dataset(batches), preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(batches),  # NNCF counts dataset items, i.e. our batches
    )
    images = sum(b.shape[0] for b in batches)
    return quantized, {"calibration_batches": len(batches), "calibration_images": images,
                       "nncf_preset": "mixed"}


def _as_numpy(batch: Any) -> np.ndarray:
    if isinstance(batch, (list, tuple)):  # tolerate (images, …) pairs
        batch = batch[0]
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    return np.ascontiguousarray(batch, dtype=np.float32)


class OpenVINORunner:
    """One compiled model; ``__call__`` maps a float32 NCHW batch to the raw output tensor.

    Sync: LATENCY hint (one stream using all threads), one request for the whole batch.
    Async: THROUGHPUT hint; the batch is split into one chunk per infer request and the chunks
    run in parallel on the streams (a single request would use one stream only and be slower
    than sync — streams only pay off with parallel requests).
    """

    def __init__(self, ov_model: Any, hint: str, use_async: bool,
                 streams: int | None = None) -> None:
        config: dict[str, Any] = {
            # Always explicit: OpenVINO's default is bf16 on CPUs that have it (AMX).
            "INFERENCE_PRECISION_HINT": hint,
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "THROUGHPUT" if use_async else "LATENCY",
        }
        if use_async and streams:
            config["NUM_STREAMS"] = int(streams)
        self.core = ov.Core()
        self.compiled = self.core.compile_model(ov_model, "CPU", config)
        ensure_signal_stack()  # the CPU plugin's own is tiny and may dangle later (see there)
        self.use_async = use_async
        if use_async:
            self.queue = ov.AsyncInferQueue(self.compiled)
            self._results: list[np.ndarray | None] = []
            self.queue.set_callback(self._store)
        else:
            self.request = self.compiled.create_infer_request()

    def _store(self, request: Any, index: int) -> None:
        # The output buffer belongs to the request and is reused: copy it out.
        self._results[index] = request.get_output_tensor(0).data.copy()

    def __call__(self, images: Any) -> torch.Tensor:
        x = _as_numpy(images)
        if not self.use_async:
            self.request.infer({INPUT_NAME: x}, share_inputs=True)
            return torch.from_numpy(self.request.get_output_tensor(0).data.copy())
        parts = min(len(self.queue), x.shape[0])
        step = math.ceil(x.shape[0] / parts)
        chunks = [x[i:i + step] for i in range(0, x.shape[0], step)]
        self._results = [None] * len(chunks)
        for index, chunk in enumerate(chunks):
            self.queue.start_async({INPUT_NAME: chunk}, userdata=index, share_inputs=True)
        self.queue.wait_all()
        return torch.from_numpy(np.concatenate(self._results, axis=0))

    def __del__(self) -> None:
        # Release the OpenVINO objects first, then replace whatever signal stack their
        # destructors restored (possibly one already freed) with ours.
        for name in ("queue", "request", "compiled", "core"):
            self.__dict__.pop(name, None)
        ensure_signal_stack()

    def details(self) -> dict[str, Any]:
        compiled = self.compiled
        effective = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        runtime = Counter()
        for op in compiled.get_runtime_model().get_ops():
            info = op.get_rt_info()
            if "runtimePrecision" in info and info["layerType"].astype(str) == "Convolution":
                runtime[info["runtimePrecision"].astype(str)] += 1
        return {
            "openvino": ov.get_version(),
            "cpu": self.core.get_property("CPU", "FULL_DEVICE_NAME"),
            "cpu_capabilities": list(self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
            "effective_inference_precision": effective,
            "conv_runtime_precisions": dict(runtime),
            "mode": "async" if self.use_async else "sync",
            "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")),
            "streams": int(compiled.get_property("NUM_STREAMS")),
            "infer_requests": len(self.queue) if self.use_async else 1,
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        }


def _build(method: str, ov_model: Any, settings: dict, details: dict) -> AcceleratedModel:
    runner = OpenVINORunner(ov_model, settings["hint"], settings["async"], settings["streams"])
    info = {**details, **runner.details(), "precision_hint": settings["hint"]}
    if method == "openvino_int8":
        precision = "int8"
    else:
        # Report what OpenVINO actually runs, not what was asked: without native bf16 the
        # CPU plugin silently keeps f32 for a bf16 hint.
        precision = PRECISION_NAMES.get(info["effective_inference_precision"],
                                        info["effective_inference_precision"])
        if settings["hint"] == "bf16" and precision != "bf16":
            info["note"] = (f"bf16 requested but this CPU has no native bf16 "
                            f"(OPTIMIZATION_CAPABILITIES={info['cpu_capabilities']}); "
                            f"OpenVINO runs {info['effective_inference_precision']}")

    def save(folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # compress_to_fp16 defaults to True and would silently round fp32 weights to fp16.
        ov.save_model(ov_model, folder / MODEL_XML, compress_to_fp16=False)
        (folder / SETTINGS_JSON).write_text(json.dumps(settings, indent=2))

    return AcceleratedModel(method=method, precision=precision, forward=runner, save=save,
                            details=info)
