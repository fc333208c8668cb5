"""TorchScript methods: ``jit_fp32`` and ``jit_bf16`` (trace + freeze).

``jit_bf16`` traces under bf16 autocast, which records the casts in the graph (the saved
TorchScript runs in bf16 without autocast at load). Tracing under autocast needs
``cache_enabled=False`` and ``requires_grad_(False)``, else the cached bf16 weight copies are
rejected as constants ("Cannot insert a Tensor that requires grad as a constant").
Artifact payload: ``model.torchscript``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pluggy
import torch

from accelcore.interfaces import AcceleratedModel, AccelerateRequest, Declaration

hookimpl = pluggy.HookimplMarker("accelcore")
PAYLOAD = "model.torchscript"

METHODS: dict[str, tuple[str, str]] = {
    "jit_fp32": ("fp32", "TorchScript trace + freeze (constant-folded, conv-BN fused), float32"),
    "jit_bf16": ("bf16", "TorchScript trace under bf16 autocast + freeze (casts baked in)"),
}


@hookimpl
def accelcore_declare() -> list[Declaration]:
    return [Declaration("backend", name, summary) for name, (_, summary) in METHODS.items()]


def _wrap(method: str, script: torch.jit.ScriptModule) -> AcceleratedModel:
    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return script(images).float()

    def save(folder: Path) -> None:
        torch.jit.save(script, str(Path(folder) / PAYLOAD))

    return AcceleratedModel(method=method, precision=METHODS[method][0], forward=forward,
                            save=save, details={"payload": PAYLOAD})


def trace_and_freeze(model: torch.nn.Module, example: torch.Tensor,
                     bf16: bool = False) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` + ``torch.jit.freeze`` of an eval-mode model (optionally bf16)."""
    model.eval().requires_grad_(False)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False) if bf16
                else contextlib.nullcontext())
    with torch.no_grad(), autocast:
        traced = torch.jit.trace(model, example, check_trace=False)
        return torch.jit.freeze(traced.eval())


@hookimpl
def accelcore_accelerate(method: str, model: Any, request: AccelerateRequest
                         ) -> AcceleratedModel | None:
    if method not in METHODS:
        return None
    from accelcore.inference.pt2e import example_input

    # Batch 2 traces as fast as batch 1 and keeps the batch size symbolic in view/reshape.
    script = trace_and_freeze(model, example_input(request.input_size, 2),
                              bf16=method == "jit_bf16")
    return _wrap(method, script)


@hookimpl
def accelcore_load_artifact(method: str, folder: Path, manifest: dict
                            ) -> AcceleratedModel | None:
    if method not in METHODS:
        return None
    path = Path(folder) / PAYLOAD
    if not path.is_file():
        raise FileNotFoundError(f"artifact payload missing: {path}")
    return _wrap(method, torch.jit.load(str(path)).eval())
