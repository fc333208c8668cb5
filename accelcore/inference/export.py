"""Model export shared by the graph backends (ONNX Runtime, OpenVINO, and anyone else).

``export_onnx`` writes a raw-output model (float32 NCHW BGR 0-255 in, raw head ``[B, N, 5 + C]``
out) to one self-contained ``.onnx`` file with a dynamic batch dimension.

Exporter choice (torch 2.13): both exporters produce a correct graph for YOLOX (max abs diff
~1e-7 vs eager, batch 1 and 3 from a batch-2 export). We default to the torch.export-based
("dynamo") exporter because it is the maintained one (default since torch 2.9; the TorchScript
exporter warns that it will be removed) and its graph is cleaner: yolox_nano has ~360 nodes
with static reshapes instead of ~510 with Shape/Gather/Constant chains, which is what the ONNX
Runtime quantizer and graph optimizer have to see through. Its cost is export time: ~10-30 s
on this 2-core machine versus ~1-6 s for the legacy exporter. ``exporter="legacy"`` is kept
for speed and as the automatic fallback when torch.export cannot trace a model.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "raw"
EXPORTER_KEY = "accelcore.exporter"
DEFAULT_OPSET = 18  # lowest opset the dynamo exporter emits; ORT and OpenVINO 2026 read it
Exporter = Literal["dynamo", "legacy", "auto"]


def _example(input_size: tuple[int, int], batch_size: int) -> torch.Tensor:
    height, width = input_size
    # Image-like values: 0-255 like the real preprocessed input (matters for nothing traced,
    # but keeps any data-dependent check honest).
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch_size, 3, height, width, generator=generator) * 255.0


def export_onnx(
    model: torch.nn.Module,
    path: str | Path,
    input_size: tuple[int, int],
    batch_size: int = 2,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    exporter: Exporter = "auto",
) -> Path:
    """Export ``model`` (eval, raw-output mode) to ``path``; return the path written.

    ``batch_size`` is the example batch; with ``dynamic_batch`` it must be >= 2 because
    torch.export specialises a size-1 dimension to a constant. ``exporter="auto"`` tries the
    dynamo exporter and falls back to the legacy one if it fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dynamic_batch and batch_size < 2:
        raise ValueError("export_onnx: a dynamic batch needs an example batch_size >= 2")
    model = model.eval()
    example = _example(tuple(input_size), batch_size)
    if exporter in ("dynamo", "auto"):
        try:
            _export_dynamo(model, example, path, dynamic_batch, opset)
            _stamp(path, "dynamo")
            return path
        except Exception as exc:
            if exporter == "dynamo":
                raise
            log.warning("dynamo ONNX export failed (%s: %s); falling back to the legacy exporter",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    elif exporter != "legacy":
        raise ValueError(f"export_onnx: unknown exporter {exporter!r}")
    _export_legacy(model, example, path, dynamic_batch, opset)
    _stamp(path, "legacy")
    return path


def exporter_of(path: str | Path) -> str:
    """Which exporter wrote ``path`` ("dynamo", "legacy" or "unknown")."""
    import onnx

    props = onnx.load(str(path), load_external_data=False).metadata_props
    return next((p.value for p in props if p.key == EXPORTER_KEY), "unknown")


def _stamp(path: Path, exporter: str) -> None:
    # Provenance in the file itself, so artifacts and reports can say how they were made.
    import onnx

    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = EXPORTER_KEY, exporter
    onnx.save(proto, str(path))


def _export_dynamo(model: torch.nn.Module, example: torch.Tensor, path: Path,
                   dynamic_batch: bool, opset: int) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    with torch.no_grad():
        torch.onnx.export(
            model, (example,), str(path),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset,
            # One self-contained file: the quantizers and our artifact loader expect that.
            external_data=False, verbose=False,
        )


def _export_legacy(model: torch.nn.Module, example: torch.Tensor, path: Path,
                   dynamic_batch: bool, opset: int) -> None:
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # we chose it knowingly
        torch.onnx.export(
            model, (example,), str(path),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamo=False, dynamic_axes=axes, opset_version=opset,
        )


def to_openvino(model: torch.nn.Module, example: torch.Tensor,
                dynamic_batch: bool = True) -> Any:
    """Convert a raw-output torch model to an ``openvino.Model`` (direct from torch, no ONNX).

    With ``dynamic_batch`` the input is declared ``[?, 3, H, W]`` so one compiled model serves
    any batch size and a batch can be split across parallel infer requests.
    """
    import openvino as ov  # heavy: imported only when a conversion is asked for

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
