"""torch.compile (inductor) methods: ``inductor_fp32``, ``inductor_bf16``, ``inductor_int8``.

All compile with inductor freezing (weights constant-folded and pre-packed for oneDNN) at a
fixed batch size. ``inductor_bf16`` adds bf16 autocast and channels_last; ``inductor_int8`` is
static PT2E int8 (``accelcore.inference.pt2e.quantize_pt2e``: X86InductorQuantizer, per-channel
weights, calibrated on real images) lowered by inductor to int8 oneDNN convolutions. Options for
``inductor_int8``: ``fp32_output_convs`` (default true: the predictor convs stay fp32),
``observer`` ("minmax", default, or "histogram"), ``reduce_range`` (7-bit activations; default
false — it cost 2.8 AP here).

Artifact payload: ``model.pt2`` (the fp32 or quantized exported program); loading compiles it
again the same way (the first call compiles; kernels are cached in TORCHINDUCTOR_CACHE_DIR).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pluggy

from accelcore.interfaces import AcceleratedModel, AccelerateRequest, Declaration

hookimpl = pluggy.HookimplMarker("accelcore")

# method -> (precision, bf16, channels_last, summary)
METHODS: dict[str, tuple[str, bool, bool, str]] = {
    "inductor_fp32": ("fp32", False, False,
                      "torch.compile (inductor, freezing), float32"),
    "inductor_bf16": ("bf16", True, True,
                      "torch.compile (inductor, freezing) under bf16 autocast, channels_last"),
    "inductor_int8": ("int8", False, False,
                      "static int8 PT2E (X86InductorQuantizer, per-channel weights, real "
                      "calibration) compiled by inductor with freezing"),
}


@hookimpl
def accelcore_declare() -> list[Declaration]:
    decls = []
    has_torchao = importlib.util.find_spec("torchao") is not None
    for name, (_, _, _, summary) in METHODS.items():
        ok = has_torchao or name != "inductor_int8"
        decls.append(Declaration("backend", name, summary, available=ok,
                                 reason="" if ok else "needs torchao (pip install torchao)"))
    return decls


def _build(method: str, module: Any, input_size: Any, details: dict,
           channels_last: bool | None = None) -> AcceleratedModel:
    from accelcore.inference.pt2e import compile_inductor, example_input, save_program

    precision, bf16, default_layout, _ = METHODS[method]
    channels_last = default_layout if channels_last is None else bool(channels_last)

    def save(folder: Path) -> None:
        save_program(module, example_input(input_size), folder)

    forward = compile_inductor(module, bf16=bf16, channels_last=channels_last)
    return AcceleratedModel(method=method, precision=precision, forward=forward, save=save,
                            details={"freezing": True, "autocast": "bf16" if bf16 else None,
                                     "channels_last": channels_last, **details})


@hookimpl
def accelcore_accelerate(method: str, model: Any, request: AccelerateRequest
                         ) -> AcceleratedModel | None:
    if method not in METHODS:
        return None
    details: dict = {}
    if method == "inductor_int8":
        from accelcore.inference.pt2e import example_input, quantize_pt2e

        options = request.options
        model, details = quantize_pt2e(
            model, example_input(request.input_size, 2), request.calibration,
            reduce_range=bool(options.get("reduce_range", False)),
            fp32_output_convs=bool(options.get("fp32_output_convs", True)),
            observer=str(options.get("observer", "minmax")))
    return _build(method, model, request.input_size, details,
                  request.options.get("channels_last"))


@hookimpl
def accelcore_load_artifact(method: str, folder: Path, manifest: dict
                            ) -> AcceleratedModel | None:
    if method not in METHODS:
        return None
    from accelcore.inference.pt2e import load_program

    details = manifest.get("details") or {}
    return _build(method, load_program(folder), manifest["input_size"], details,
                  details.get("channels_last"))
