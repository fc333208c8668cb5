"""torch.compile (inductor) methods: ``inductor_fp32``, ``inductor_bf16``, ``inductor_int8``.

All compile with inductor freezing (weights constant-folded and pre-packed for oneDNN) at a
fixed batch size. ``inductor_bf16`` adds bf16 autocast and channels_last; ``inductor_int8`` is
static PT2E int8 (``accelcore.inference.pt2e.quantize_pt2e``: X86InductorQuantizer, per-channel
weights, calibrated on real images) lowered by inductor to int8 oneDNN convolutions. Options for
``inductor_int8``: ``fp32_output_convs`` (default true: the predictor convs stay fp32),
``observer`` ("minmax", default, or "histogram"), ``reduce_range`` (7-bit activations; default
false — it cost 2.8 AP here). Every method takes ``channels_last`` (bool) to override its layout.

Compiled ahead of time (``accelcore.inference.aot``: AOTInductor, same inductor and freezing,
a C++ wrapper instead of a Python one). Artifact payload: ``compiled.pt2`` (the package, for the
CPU and torch it was built with) and ``model.pt2`` (the portable exported program, compiled again
on first call where the package cannot run).
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
        from accelcore.inference.aot import compile_ahead

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
        bf16, layout = self._precision(method, request.options.get("channels_last"))
        forward, save, compiled = compile_ahead(model, request.input_size, request.work_dir,
                                                bf16=bf16, channels_last=layout)
        return self._accelerated(method, forward, save, {**details, **compiled}, bf16, layout)

    def load(self, method: str, folder: Path, manifest: dict) -> AcceleratedModel:
        from accelcore.inference.aot import load_compiled

        details = manifest.get("details") or {}
        bf16, layout = self._precision(method, details.get("channels_last"))
        forward, save, compiled = load_compiled(folder, details, bf16=bf16, channels_last=layout)
        return self._accelerated(method, forward, save, {**details, **compiled}, bf16, layout)

    def _precision(self, method: str, channels_last: bool | None) -> tuple[bool, bool]:
        """(bf16 autocast, channels_last) of ``method``, the layout overridable."""
        row = self.methods[method]
        layout = row.channels_last if channels_last is None else bool(channels_last)
        return row.compute == "bf16", layout

    def _accelerated(self, method: str, forward: Any, save: Any, details: dict, bf16: bool,
                     layout: bool) -> AcceleratedModel:
        return AcceleratedModel(
            method=method, precision=self.methods[method].compute, forward=forward, save=save,
            details={**details, "freezing": True, "autocast": "bf16" if bf16 else None,
                     "channels_last": layout})


plugin = InductorBackend()
