"""Intel Neural Compressor 3.x: ``int8`` — static post-training quantization.

``neural_compressor.torch`` export → ``prepare(model, StaticQuantConfig)`` → calibration on real
images → ``convert``. Without IPEX (our torch 2.13 environment) INC routes this through PT2E
with torchao's X86InductorQuantizer, so the result is a Q/DQ graph that only runs int8 kernels
after inductor compiles it with freezing (``accelcore.inference.aot``).
Only the raw-output network is quantized; decode (exp, sigmoid) stays in fp32 in the core.

Weights int8 per-channel symmetric, activations uint8 per-tensor with min/max ranges; the
predictor convs that feed the output stay fp32 (option ``fp32_output_convs``, default true).
Compiled ahead of time (``accelcore.inference.aot``); artifact payload: ``compiled.pt2`` (the
AOTInductor package for this CPU) and ``model.pt2`` (the portable quantized program, compiled again
on first call where the package cannot run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelcore.backend import Backend, Method
from accelcore.interfaces import AcceleratedModel, AccelerateRequest


def quantize_inc(model: Any, example: Any, calibration: Any,
                 fp32_output_convs: bool = True) -> tuple[Any, dict]:
    """INC static int8 of the raw-output model; returns (converted Q/DQ module, details).

    ``fp32_output_convs`` keeps the predictor convs (``output_tail_modules``) in float32.
    """
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare

    from accelcore.inference.export import dynamic_batch
    from accelcore.inference.pt2e import calibrate, output_tail_modules, quantization_details

    example, dynamic_shapes = dynamic_batch(example)
    exported = export(model, (example,), dynamic_shapes=dynamic_shapes)
    if exported is None:  # INC logs the export error and returns None
        raise RuntimeError("neural_compressor export of the raw-output model failed")
    config = StaticQuantConfig(w_dtype="int8", w_sym=True, w_granularity="per_channel",
                               act_dtype="uint8", act_sym=False, act_granularity="per_tensor",
                               act_algo="minmax")
    keep = output_tail_modules(exported) if fp32_output_convs else []
    for name in keep:
        config.set_local(name, StaticQuantConfig(w_dtype="fp32", act_dtype="fp32"))
    prepared = prepare(exported, config)
    images = calibrate(prepared, calibration)
    converted = convert(prepared)
    return converted, quantization_details(images, False, keep, "minmax")


class IncBackend(Backend):
    methods = {
        "int8": Method("Intel Neural Compressor static PTQ (PT2E, int8 per-channel weights, real "
                       "calibration) compiled by inductor with freezing", "int8"),
    }
    # neural_compressor.torch: the package without it is INC's TensorFlow-era distribution.
    requires = ("neural_compressor.torch", "torchao")
    install = "pip install 'accelcore[int8]'"
    packages = ("neural-compressor-pt", "torchao")

    def accelerate(self, method: str, model: Any, request: AccelerateRequest) -> AcceleratedModel:
        from accelcore.inference.export import example_input

        converted, details = quantize_inc(
            model, example_input(request.input_size), request.calibration,
            fp32_output_convs=bool(request.options.get("fp32_output_convs", True)))
        from accelcore.inference.aot import compile_ahead

        forward, save, compiled = compile_ahead(converted, request.input_size, request.work_dir)
        return self._accelerated(method, forward, save, {**details, **compiled})

    def load(self, method: str, folder: Path, manifest: dict) -> AcceleratedModel:
        from accelcore.inference.aot import load_compiled

        details = manifest.get("details") or {}
        forward, save, compiled = load_compiled(folder, details)
        return self._accelerated(method, forward, save, {**details, **compiled})

    def _accelerated(self, method: str, forward: Any, save: Any,
                     details: dict) -> AcceleratedModel:
        return AcceleratedModel(method=method, precision="int8", forward=forward, save=save,
                                details={**details, "freezing": True})


plugin = IncBackend()
