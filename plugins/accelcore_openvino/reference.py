"""Reference row ``openvino_plain_*``: OpenVINO used directly, as its documentation says.

``ov.convert_model`` of the same torch model, optionally ``nncf.quantize`` with its defaults on
the same calibration images, ``compile_model`` with the THROUGHPUT hint and nothing else set
(so OpenVINO picks its own precision: bf16 where the CPU has it), and the batch sent as parallel
infer requests the way ``benchmark_app`` does. How the batch is sent is chosen by measuring, on
this machine, each of: one request per image (batch-1 model), one request per stream slice,
one whole-batch request — the fastest is kept and the timings of all are in ``settings``. The
reference is given every advantage a careful user would find; none of accelcore's own tuning.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import openvino as ov
import torch

from accelcore.inference.latency import measure_latency
from accelcore.interfaces import AcceleratedModel, AccelerateRequest
from accelcore_openvino.signal_stack import ensure_signal_stack

#: How many timed calls decide between the request layouts (after one warm-up call each).
TRIAL_CALLS = 3


class _Layout:
    """One way of sending a batch: a model compiled for a fixed request batch + a queue."""

    def __init__(self, core: Any, ov_model: Any, name: str, request_batch: int,
                 height: int, width: int) -> None:
        model = ov_model.clone()
        model.reshape([request_batch, 3, height, width])
        self.name = name
        self.request_batch = request_batch
        self.compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
        self.queue = ov.AsyncInferQueue(self.compiled)  # jobs=0: OpenVINO's optimal count
        self._out: list[np.ndarray | None] = []
        self.queue.set_callback(self._keep)

    def _keep(self, request: Any, index: int) -> None:
        self._out[index] = request.get_output_tensor(0).data.copy()

    def release(self) -> None:
        for name in ("queue", "compiled"):
            self.__dict__.pop(name, None)
        ensure_signal_stack()  # OpenVINO may put back a freed signal stack (see there)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.numpy(), dtype=np.float32)
        step = self.request_batch
        n = math.ceil(x.shape[0] / step)
        self._out = [None] * n
        for i in range(n):
            chunk = x[i * step:(i + 1) * step]
            if chunk.shape[0] < step:  # a fixed-shape model: pad the last request
                chunk = np.concatenate([chunk, np.zeros((step - chunk.shape[0], *x.shape[1:]),
                                                        np.float32)])
            self.queue.start_async({0: chunk}, userdata=i)
        self.queue.wait_all()
        return torch.from_numpy(np.concatenate(self._out)[: x.shape[0]])


def _median_ms(fn: Any, batch: torch.Tensor) -> float:
    return measure_latency(fn, batch, warmup=1, min_runs=TRIAL_CALLS, min_seconds=0.0,
                           max_runs=TRIAL_CALLS)["median_ms"]


def build(name: str, model: torch.nn.Module, request: AccelerateRequest,
          quantize: bool) -> AcceleratedModel:
    """The ``openvino_plain_int8`` (``quantize``) or ``openvino_plain_default`` reference."""
    height, width = request.input_size
    example = torch.rand(2, 3, height, width) * 255.0
    ov_model = ov.convert_model(model, example_input=example)
    settings: dict[str, Any] = {"performance_hint": "THROUGHPUT",
                                "inference_precision": "OpenVINO's default"}
    if quantize:
        import nncf

        batches = [b.numpy() for b in request.calibration()] if request.calibration else []
        ov_model = nncf.quantize(ov_model, nncf.Dataset(batches))  # every default kept
        ensure_signal_stack()
        settings["nncf"] = f"defaults, {sum(b.shape[0] for b in batches)} calibration images"
    core = ov.Core()
    trial = torch.rand(request.batch_size, 3, height, width) * 255.0
    streams_probe = core.compile_model(ov_model, "CPU", {"PERFORMANCE_HINT": "THROUGHPUT"})
    nireq = int(streams_probe.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    del streams_probe
    ensure_signal_stack()
    candidates = {"batch-1 requests": 1,
                  f"{nireq} requests of {math.ceil(request.batch_size / nireq)}":
                      math.ceil(request.batch_size / nireq),
                  "one whole-batch request": request.batch_size}
    timings: dict[str, float] = {}
    best: _Layout | None = None
    for label, request_batch in candidates.items():
        layout = _Layout(core, ov_model, label, request_batch, height, width)
        ensure_signal_stack()
        timings[label] = round(_median_ms(layout, trial), 1)
        if best is None or timings[label] < timings[best.name]:
            if best is not None:
                best.release()
            best = layout
        else:
            layout.release()
    assert best is not None
    compiled = best.compiled
    settings.update({
        "requests": best.name, "trial_ms": timings,
        "streams": int(compiled.get_property("NUM_STREAMS")),
        "infer_requests": len(best.queue),
        "effective_precision": compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
        "openvino": ov.get_version(),
    })
    precision = "int8" if quantize else {"bf16": "bf16", "f32": "fp32", "f16": "fp16"}.get(
        settings["effective_precision"], settings["effective_precision"])
    return AcceleratedModel(method=name, precision=precision, forward=best, details=settings)
