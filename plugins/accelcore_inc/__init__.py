"""Intel Neural Compressor 3.x: ``int8`` — static post-training quantization.

``neural_compressor.torch`` export → ``prepare(model, StaticQuantConfig)`` → calibration on real
images → ``convert``. Without IPEX (our torch 2.13 environment) INC routes this through PT2E
with torchao's X86InductorQuantizer, so the result is a Q/DQ graph that only runs int8 kernels
after ``torch.compile`` with inductor freezing (``accelcore.inference.pt2e.compile_inductor``).
Only the raw-output network is quantized; decode (exp, sigmoid) stays in fp32 in the core.

Weights int8 per-channel symmetric, activations uint8 per-tensor with min/max ranges; the
predictor convs that feed the output stay fp32 (option ``fp32_output_convs``, default true).
Artifact payload: ``model.pt2`` (the quantized exported program), compiled again at load.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pluggy

from accelcore.interfaces import AcceleratedModel, AccelerateRequest, Declaration

hookimpl = pluggy.HookimplMarker("accelcore")
METHOD = "int8"
SUMMARY = ("Intel Neural Compressor static PTQ (PT2E, int8 per-channel weights, real "
           "calibration) compiled by inductor with freezing")


def _available() -> tuple[bool, str]:
    for module, package in (("neural_compressor", "neural-compressor-pt"),
                            ("torchao", "torchao")):
        if importlib.util.find_spec(module) is None:
            return False, f"needs {package} (pip install 'accelcore[int8]')"
    if importlib.util.find_spec("neural_compressor.torch") is None:
        return False, "neural_compressor has no torch API: install neural-compressor-pt"
    return True, ""


@hookimpl
def accelcore_declare() -> list[Declaration]:
    ok, reason = _available()
    return [Declaration("backend", METHOD, SUMMARY, available=ok, reason=reason)]


def quantize_inc(model: Any, example: Any, calibration: Any,
                 fp32_output_convs: bool = True) -> tuple[Any, dict]:
    """INC static int8 of the raw-output model; returns (converted Q/DQ module, details).

    ``fp32_output_convs`` keeps the predictor convs (``output_tail_modules``) in float32.
    """
    import torch
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare

    from accelcore.inference.pt2e import calibrate, output_tail_modules, quantization_details

    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    exported = export(model, (example,), dynamic_shapes=dynamic)
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


def _build(module: Any, input_size: Any, details: dict) -> AcceleratedModel:
    from accelcore.inference.pt2e import compile_inductor, example_input, save_program

    def save(folder: Path) -> None:
        save_program(module, example_input(input_size), folder)

    return AcceleratedModel(method=METHOD, precision="int8", forward=compile_inductor(module),
                            save=save, details={"freezing": True, **details})


@hookimpl
def accelcore_accelerate(method: str, model: Any, request: AccelerateRequest
                         ) -> AcceleratedModel | None:
    if method != METHOD:
        return None
    from accelcore.errors import BackendUnavailable
    from accelcore.inference.pt2e import example_input

    ok, reason = _available()
    if not ok:
        raise BackendUnavailable(reason)
    converted, details = quantize_inc(
        model, example_input(request.input_size, 2), request.calibration,
        fp32_output_convs=bool(request.options.get("fp32_output_convs", True)))
    return _build(converted, request.input_size, details)


@hookimpl
def accelcore_load_artifact(method: str, folder: Path, manifest: dict
                            ) -> AcceleratedModel | None:
    if method != METHOD:
        return None
    from accelcore.inference.pt2e import load_program

    return _build(load_program(folder), manifest["input_size"], manifest.get("details") or {})
