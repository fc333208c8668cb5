"""OpenVINO conversion, NNCF quantization, input preprocessing in the graph, compilation, and
the runner whose per-request batch is tuned on the machine at hand."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import torch

from accelcore.errors import BackendUnavailable
from accelcore.inference.export import INPUT_NAME, OUTPUT_NAME, deploy_form, example_input
from accelcore.inference.image_format import FLOAT_NCHW, IMAGE_FORMATS, UINT8_NHWC, to_format
from accelcore.inference.latency import measure_latency
from accelcore.interfaces import AcceleratedModel, AccelerateRequest
from accelcore.machine import has_native
from accelcore_openvino.signal_stack import ensure_signal_stack

MODEL_XML = "model.xml"
SETTINGS_JSON = "openvino.json"
PRECISION_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}
#: Per-request batch sizes tried by ``request_batch: auto`` (plus one request per stream).
#: Small requests keep a layer's activations in the core's L2 cache; measured on a 2-core
#: Sapphire Rapids (yolox_nano 416 px, bf16, a batch of 64): 1 → 564 ms, 4 → 585, 8 → 572,
#: 16 → 631 with the sliced stem; 2-16 within noise once the stem is one convolution — so the
#: best size is machine- and model-specific and is measured, not assumed.
REQUEST_BATCHES = (1, 2, 4, 8, 16)
#: Timed calls per candidate when tuning (after one warm-up); the median decides.
TUNE_CALLS = 3
#: Infer requests kept in flight per request OpenVINO finds optimal (see OpenVINORunner).
REQUESTS_PER_STREAM = 2


def accelerate(method: str, model: torch.nn.Module,
               request: AccelerateRequest) -> AcceleratedModel:
    from accelcore_openvino import OpenVINOBackend

    options = request.options
    if method == "openvino_int8" and request.calibration is None:
        # Fail before the conversion.
        raise BackendUnavailable("openvino_int8: needs calibration data "
                                 "(AccelerateRequest.calibration is None)")
    use_deploy_form = bool(options.get("deploy_form", True))
    if use_deploy_form:
        model = deploy_form(model)
    # At least 2 images, so the traced graph keeps the batch dimension symbolic.
    ov_model = to_openvino(model, example_input(request.input_size, min(request.batch_size, 4)))
    details: dict[str, Any] = {"deploy_form": use_deploy_form}
    hint = OpenVINOBackend.methods[method].hint
    if method == "openvino_int8":
        ov_model, quant = _quantize(ov_model, request)
        details.update(quant)
        ensure_signal_stack()  # NNCF compiled and released models of its own
        # The layers left in float run in bf16 where the CPU has it natively (AMX,
        # AVX512-BF16) — OpenVINO's own default there; f32 elsewhere.
        float_hint = options.get("float_hint", "auto")
        hint = ("bf16" if has_native("bf16") else "f32") if float_hint == "auto" else float_hint
    input_format = options.get("input_format", UINT8_NHWC)
    if input_format not in IMAGE_FORMATS:
        raise BackendUnavailable(f"{method}: option input_format={input_format!r}; allowed: "
                                 f"{', '.join(IMAGE_FORMATS)}")
    if input_format == UINT8_NHWC:
        ov_model = _take_uint8_nhwc(ov_model)
    settings = {"hint": hint, "input_format": input_format,
                "streams": options.get("streams"),
                "request_batch": options.get("request_batch", "auto")}
    if settings["request_batch"] == "auto":
        trial = _trial_batch(request, input_format)
        settings["request_batch"], details["request_batch_trials_ms"] = _tune_request_batch(
            ov_model, settings, trial)
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


def output_tail(ov_model: Any) -> list[str]:
    """Names of the convolutions that feed the output directly (through reshapes, concats,
    activations — anything but another convolution): the detector's predictor convs. Int8,
    they would squeeze box offsets, objectness and class logits into one 8-bit scale (the PT2E
    and ONNX Runtime methods keep the same convs float)."""
    names: list[str] = []
    seen: set[str] = set()
    stack = [result.input_value(0).get_node() for result in ov_model.get_results()]
    while stack:
        node = stack.pop()
        if node.get_friendly_name() in seen:
            continue
        seen.add(node.get_friendly_name())
        if node.get_type_name() == "Convolution":
            names.append(node.get_friendly_name())
            continue
        stack.extend(value.get_node() for value in node.input_values())
    return names


def _quantize(ov_model: Any, request: AccelerateRequest) -> tuple[Any, dict]:
    """NNCF post-training quantization on real calibration batches.

    Options: ``preset`` ("mixed", default: symmetric weights, asymmetric activations — SiLU
    outputs are not centred on zero; or "performance", NNCF's default), ``fp32_output_convs``
    (default true: the predictor convs stay float, see :func:`output_tail`).
    """
    import nncf

    assert request.calibration is not None  # checked in accelerate()
    batches = [_as_numpy(batch) for batch in request.calibration()]
    if not batches:
        raise BackendUnavailable("openvino_int8: the calibration iterator yielded no batch")
    preset_name = request.options.get("preset", "mixed")
    presets = {"mixed": nncf.QuantizationPreset.MIXED,
               "performance": nncf.QuantizationPreset.PERFORMANCE}
    if preset_name not in presets:
        raise BackendUnavailable(f"openvino_int8: option preset={preset_name!r}; allowed: "
                                 f"{', '.join(presets)}")
    tail = output_tail(ov_model) if request.options.get("fp32_output_convs", True) else []
    quantized = nncf.quantize(
        ov_model, nncf.Dataset(batches), preset=presets[preset_name],
        subset_size=len(batches),  # NNCF counts dataset items, i.e. our batches
        ignored_scope=nncf.IgnoredScope(names=tail) if tail else None,
    )
    images = sum(b.shape[0] for b in batches)
    return quantized, {"calibration_batches": len(batches), "calibration_images": images,
                       "nncf_preset": preset_name, "float_output_convs": len(tail)}


def _take_uint8_nhwc(ov_model: Any) -> Any:
    """The model with its input as uint8 NHWC: the conversion to float and the layout change
    run inside the compiled graph, on a quarter of the bytes (a float32 batch of 64 at 416 px is
    133 MB). Measured on a 2-core Sapphire Rapids, bf16: 510 → 480 ms per 64 images."""
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(ov_model)
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    return ppp.build()


def _trial_batch(request: AccelerateRequest, input_format: str) -> np.ndarray:
    """A batch of real calibration images at the request's batch size, for tuning."""
    images = [_as_numpy(b) for b in request.calibration()] if request.calibration else []
    pool = np.concatenate(images) if images else np.full(
        (1, 3, *request.input_size), 114.0, np.float32)
    reps = math.ceil(request.batch_size / pool.shape[0])
    batch = np.concatenate([pool] * reps)[: request.batch_size]
    return to_format(batch, input_format).numpy()


def _tune_request_batch(ov_model: Any, settings: dict,
                        trial: np.ndarray) -> tuple[int, dict[str, float]]:
    """Measure each per-request batch size on this machine; the fastest median wins."""
    batch = trial.shape[0]
    candidates = sorted({min(b, batch) for b in REQUEST_BATCHES} | {batch})
    timings: dict[str, float] = {}
    best, best_ms = candidates[0], math.inf
    for request_batch in candidates:
        runner = OpenVINORunner(ov_model, settings["hint"], request_batch, settings["streams"])
        ms = measure_latency(runner, trial, warmup=1, min_runs=TUNE_CALLS, min_seconds=0.0,
                             max_runs=TUNE_CALLS)["median_ms"]
        del runner
        timings[str(request_batch)] = round(ms, 1)
        if ms < best_ms:
            best, best_ms = request_batch, ms
    return best, timings


def _as_numpy(batch: Any) -> np.ndarray:
    if isinstance(batch, (list, tuple)):  # tolerate (images, …) pairs
        batch = batch[0]
    if isinstance(batch, torch.Tensor):
        batch = batch.detach().cpu().numpy()
    return np.ascontiguousarray(batch, dtype=np.float32)


class OpenVINORunner:
    """One model compiled for a fixed per-request batch; ``__call__`` maps a batch (in the
    model's input format) to the raw output tensor.

    THROUGHPUT hint (one stream per core pair, OpenVINO's choice unless ``streams``): the batch
    is cut into requests of ``request_batch`` images that run in parallel on the streams; the
    last request is padded to the fixed shape. A static shape per request lets the CPU plugin
    pick its kernels once; a small request keeps each layer's activations in cache.

    The requests are plain ``InferRequest`` objects used in turn (``start_async``, then ``wait``
    before reuse, outputs copied out here) — no ``AsyncInferQueue`` with a Python callback. That
    queue's callback held the runner (a reference cycle through a native object, never freed:
    every load kept its compiled model, ~30 MB for yolox_nano int8 — found by
    ``benchmarks/soak.py``), and once freed, its destructor could deadlock: it runs holding the
    GIL while an OpenVINO thread drops its copy of the Python callback, which needs the GIL
    (openvinotoolkit/openvino#37073).
    """

    def __init__(self, ov_model: Any, hint: str, request_batch: int,
                 streams: int | None = None) -> None:
        model = ov_model.clone()
        shape = list(model.inputs[0].get_partial_shape())
        shape[0] = request_batch
        model.reshape({model.inputs[0]: ov.PartialShape(shape)})
        config: dict[str, Any] = {
            # Always explicit: OpenVINO's default is bf16 on CPUs that have it (AMX).
            "INFERENCE_PRECISION_HINT": hint,
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "THROUGHPUT",
        }
        if streams:
            config["NUM_STREAMS"] = int(streams)
        self.request_batch = request_batch
        self.core = ov.Core()
        self.compiled = self.core.compile_model(model, "CPU", config)
        ensure_signal_stack()  # the CPU plugin's own is tiny and may dangle later (see there)
        # Twice OpenVINO's optimum (one per stream) in flight: the requests are waited for in
        # order, and with one per stream a stream slowed by another thread (the streaming
        # predictor's image decoding) held the next request of the other stream back; with a
        # second one queued a free stream always has work. Streaming 416 px int8 on a 2-core
        # Zen 4 (with lower-priority readers): ~152 -> ~165 img/s.
        count = REQUESTS_PER_STREAM * int(
            self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.requests = [self.compiled.create_infer_request() for _ in range(max(1, count))]

    def __call__(self, images: Any) -> torch.Tensor:
        x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        x = np.ascontiguousarray(x)
        n, step = x.shape[0], self.request_batch
        parts = math.ceil(n / step)
        results: list[np.ndarray | None] = [None] * parts
        # request slot -> (part index, its input: shared with the request, kept alive here)
        running: dict[int, tuple[int, np.ndarray]] = {}

        def collect(slot: int) -> None:
            index, _ = running.pop(slot)
            request = self.requests[slot]
            request.wait()  # releases the GIL
            # The output buffer belongs to the request and is reused: copy it out.
            results[index] = request.get_output_tensor(0).data.copy()

        for index in range(parts):
            chunk = x[index * step:(index + 1) * step]
            if chunk.shape[0] < step:  # fixed-shape model: pad the last request
                pad = np.zeros((step - chunk.shape[0], *x.shape[1:]), x.dtype)
                chunk = np.concatenate((chunk, pad))
            slot = index % len(self.requests)
            if slot in running:
                collect(slot)
            running[slot] = (index, chunk)
            self.requests[slot].start_async({0: chunk}, share_inputs=True)
        for slot in list(running):
            collect(slot)
        return torch.from_numpy(np.concatenate(results, axis=0)[:n])

    def __del__(self) -> None:
        # Release the OpenVINO objects first, then replace whatever signal stack their
        # destructors restored (possibly one already freed) with ours.
        for name in ("requests", "compiled", "core"):
            self.__dict__.pop(name, None)
        if not sys.is_finalizing():  # at exit the modules it needs may already be gone
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
            "performance_hint": str(compiled.get_property("PERFORMANCE_HINT")),
            "streams": int(compiled.get_property("NUM_STREAMS")),
            "infer_requests": len(self.requests),
            "request_batch": self.request_batch,
            "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        }


def _build(method: str, ov_model: Any, settings: dict, details: dict) -> AcceleratedModel:
    # Artifacts written before the tuned runner carry neither key: float input, one request
    # per image (the slowest safe choice is not needed: any size gives the same output).
    settings = {"input_format": FLOAT_NCHW, "request_batch": 1, "streams": None, **settings}
    runner = OpenVINORunner(ov_model, settings["hint"], int(settings["request_batch"]),
                            settings["streams"])
    info = {**details, **runner.details(), "precision_hint": settings["hint"],
            "input_format": settings["input_format"]}
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
                            details=info, input_format=settings["input_format"])
