"""Eager PyTorch methods: ``original`` (fp32 baseline), ``bf16``, ``bf16_channels_last``.

Artifact payload: ``model.pt2`` (``torch.export`` of the fp32 raw-output model, dynamic batch);
loading re-applies the method's autocast / memory format, exactly as during measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelcore.backend import Backend, Method, Reference
from accelcore.interfaces import AcceleratedModel, AccelerateRequest


@dataclass(frozen=True)
class EagerMethod(Method):
    channels_last: bool = False


class TorchBackend(Backend):
    methods = {
        "original": EagerMethod("eager PyTorch, float32 (the baseline)", "fp32"),
        "bf16": EagerMethod("eager PyTorch under bf16 autocast (fp32 weights, convs/matmuls in "
                            "bf16)", "bf16"),
        "bf16_channels_last": EagerMethod("eager bf16 autocast with channels_last (NHWC) weights "
                                          "and input", "bf16", channels_last=True),
    }

    references = {
        "torch_plain_fp32": Reference(
            "stock PyTorch: eager fp32, NCHW, torch.no_grad, default threads and allocator — "
            "what a user has before installing accelcore", "fp32", stock_runtime=True),
    }

    def accelerate(self, method: str, model: Any, request: AccelerateRequest) -> AcceleratedModel:
        return self._build(method, model, request.input_size)

    def reference(self, name: str, model: Any, request: AccelerateRequest) -> AcceleratedModel:
        import torch

        def forward(images: Any) -> Any:
            with torch.no_grad():
                return model(images)

        return AcceleratedModel(method=name, precision="fp32", forward=forward,
                                details={"mode": "eager, torch.no_grad, NCHW"})

    def load(self, method: str, folder: Path, manifest: dict) -> AcceleratedModel:
        from accelcore.inference.pt2e import load_program

        return self._build(method, load_program(folder), manifest["input_size"])

    def _build(self, method: str, module: Any, input_size: Any) -> AcceleratedModel:
        from accelcore.inference.pt2e import eager_forward, program_saver

        row = self.methods[method]
        bf16 = row.compute == "bf16"
        return AcceleratedModel(
            method=method, precision=row.compute,
            forward=eager_forward(module, bf16=bf16, channels_last=row.channels_last),
            save=program_saver(module, input_size),
            details={"autocast": "bf16" if bf16 else None, "channels_last": row.channels_last})


plugin = TorchBackend()
