"""torch.compile (inductor) methods: ``inductor_fp32``, ``inductor_bf16``, ``inductor_int8``.

All compile with inductor freezing (weights constant-folded and pre-packed for oneDNN) at a
fixed batch size. ``inductor_bf16`` adds bf16 autocast and channels_last; ``inductor_int8`` is
static PT2E int8 (``accelcore.inference.pt2e.quantize_pt2e``: X86InductorQuantizer, per-channel
weights, calibrated on real images) lowered by inductor to int8 oneDNN convolutions. Options for
``inductor_int8``: ``fp32_output_convs`` (default true: the predictor convs stay fp32),
``observer`` ("minmax", default, or "histogram"), ``reduce_range`` (7-bit activations; default
false — it cost 2.8 AP here). Every method takes ``channels_last`` (bool) to override its layout.

Artifact payload: ``model.pt2`` (the fp32 or quantized exported program); loading compiles it
again the same way (the first call compiles; kernels are cached in TORCHINDUCTOR_CACHE_DIR).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelcore.backend import Backend, Method
from accelcore.interfaces import AcceleratedModel, AccelerateRequest


@dataclass(frozen=True)
class CompiledMethod(Method):
    channels_last: bool = False


class InductorBackend(Backend):
    methods = {
        "inductor_fp32": CompiledMethod("torch.compile (inductor, freezing), float32", "fp32"),
        "inductor_bf16": CompiledMethod("torch.compile (inductor, freezing) under bf16 autocast, "
                                        "channels_last", "bf16", channels_last=True),
        "inductor_int8": CompiledMethod(
            "static int8 PT2E (X86InductorQuantizer, per-channel weights, real calibration) "
            "compiled by inductor with freezing", "int8", requires=("torchao",)),
    }
    install = "pip install torchao"
    packages = ("torchao",)

    def accelerate(self, method: str, model: Any, request: AccelerateRequest) -> AcceleratedModel:
        details: dict = {}
        if method == "inductor_int8":
            from accelcore.inference.export import example_input
            from accelcore.inference.pt2e import quantize_pt2e

            options = request.options
            model, details = quantize_pt2e(
                model, example_input(request.input_size), request.calibration,
                reduce_range=bool(options.get("reduce_range", False)),
                fp32_output_convs=bool(options.get("fp32_output_convs", True)),
                observer=str(options.get("observer", "minmax")))
        return self._build(method, model, request.input_size, details,
                           request.options.get("channels_last"))

    def load(self, method: str, folder: Path, manifest: dict) -> AcceleratedModel:
        from accelcore.inference.pt2e import load_program

        details = manifest.get("details") or {}
        return self._build(method, load_program(folder), manifest["input_size"], details,
                           details.get("channels_last"))

    def _build(self, method: str, module: Any, input_size: Any, details: dict,
               channels_last: bool | None) -> AcceleratedModel:
        from accelcore.inference.pt2e import compile_frozen, program_saver

        row = self.methods[method]
        bf16 = row.compute == "bf16"
        layout = row.channels_last if channels_last is None else bool(channels_last)
        return AcceleratedModel(
            method=method, precision=row.compute,
            forward=compile_frozen(module, bf16=bf16, channels_last=layout),
            save=program_saver(module, input_size),
            details={"freezing": True, "autocast": "bf16" if bf16 else None,
                     "channels_last": layout, **details})


plugin = InductorBackend()
