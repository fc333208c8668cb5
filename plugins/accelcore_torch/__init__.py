"""Eager PyTorch methods: ``original`` (fp32 baseline), ``bf16``, ``bf16_channels_last``.

Artifact payload: ``model.pt2`` (``torch.export`` of the fp32 raw-output model, dynamic batch);
loading re-applies the method's autocast / memory format, exactly as during measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pluggy

from accelcore.interfaces import AcceleratedModel, AccelerateRequest, Declaration

hookimpl = pluggy.HookimplMarker("accelcore")

# method -> (precision, bf16 autocast, channels_last, summary)
METHODS: dict[str, tuple[str, bool, bool, str]] = {
    "original": ("fp32", False, False, "eager PyTorch, float32 (the baseline)"),
    "bf16": ("bf16", True, False,
             "eager PyTorch under bf16 autocast (fp32 weights, convs/matmuls in bf16)"),
    "bf16_channels_last": ("bf16", True, True,
                           "eager bf16 autocast with channels_last (NHWC) weights and input"),
}


@hookimpl
def accelcore_declare() -> list[Declaration]:
    return [Declaration("backend", name, summary) for name, (_, _, _, summary) in METHODS.items()]


def _build(method: str, module: Any, input_size: Any) -> AcceleratedModel:
    from accelcore.inference.pt2e import eager_forward, example_input, save_program

    precision, bf16, channels_last, summary = METHODS[method]

    def save(folder: Path) -> None:
        save_program(module, example_input(input_size), folder)

    return AcceleratedModel(
        method=method, precision=precision,
        forward=eager_forward(module, bf16=bf16, channels_last=channels_last), save=save,
        details={"autocast": "bf16" if bf16 else None, "channels_last": channels_last})


@hookimpl
def accelcore_accelerate(method: str, model: Any, request: AccelerateRequest
                         ) -> AcceleratedModel | None:
    if method not in METHODS:
        return None
    return _build(method, model, request.input_size)


@hookimpl
def accelcore_load_artifact(method: str, folder: Path, manifest: dict
                            ) -> AcceleratedModel | None:
    if method not in METHODS:
        return None
    from accelcore.inference.pt2e import load_program

    return _build(method, load_program(folder), manifest["input_size"])
