"""What every backend converts with: the example batch, the dynamic batch, the ONNX export.

* :func:`example_input` — the deterministic image-like batch a backend traces / exports /
  warms up with (at least :data:`MIN_EXAMPLE_BATCH` images: tracing and ``torch.export``
  specialise a batch dimension of size 1 to a constant).
* :func:`dynamic_batch` — an example padded to that minimum together with the
  ``torch.export`` ``dynamic_shapes`` spec that keeps its batch dimension symbolic.
* :func:`export_onnx` writes a raw-output model (float32 NCHW BGR 0-255 in, the raw output
  ``[B, N, K]`` out) to one self-contained ``.onnx`` file with a dynamic batch dimension.

These are torch's own export paths (tracing, ``torch.export``, ``torch.onnx``); the
backend-specific conversions built on them live in the backend plugins.

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

from accelcore.errors import one_line

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "raw"
EXPORTER_KEY = "accelcore.exporter"
DEFAULT_OPSET = 18  # lowest opset the dynamo exporter emits; ORT and OpenVINO 2026 read it
Exporter = Literal["dynamo", "legacy", "auto"]
#: Smallest example batch: a batch dimension of size 1 is specialised to a constant.
MIN_EXAMPLE_BATCH = 2
#: Largest batch a dynamic-batch export accepts.
MAX_BATCH = 4096


def example_input(input_size: tuple[int, int] | list[int],
                  batch_size: int = MIN_EXAMPLE_BATCH) -> torch.Tensor:
    """A deterministic float32 ``[max(2, batch_size), 3, H, W]`` batch for tracing/export only.

    Image-like values (0-255 like the real preprocessed input): they matter for nothing traced,
    but keep any data-dependent check honest.
    """
    height, width = int(input_size[0]), int(input_size[1])
    generator = torch.Generator().manual_seed(0)
    return torch.rand(max(MIN_EXAMPLE_BATCH, int(batch_size)), 3, height, width,
                      generator=generator) * 255.0


def dynamic_batch(example: torch.Tensor) -> tuple[torch.Tensor, tuple[dict[int, Any]]]:
    """``(example, dynamic_shapes)`` for ``torch.export`` of a one-input model whose dim 0 is
    the batch: a smaller example is repeated up to :data:`MIN_EXAMPLE_BATCH` images."""
    if example.shape[0] < MIN_EXAMPLE_BATCH:
        example = example.expand(MIN_EXAMPLE_BATCH, *example.shape[1:]).contiguous()
    return example, ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def deploy_form(model: torch.nn.Module) -> torch.nn.Module:
    """The model's exactly-equivalent graph-runtime form, if its plugin offers one
    (``Detector.deploy_form``: e.g. strided slicing folded into a convolution), else itself.

    Graph backends call this before converting (option ``deploy_form``, default on); it is
    checked to give the same output as the model, so a wrong rewrite fails the conversion.
    """
    make = getattr(model, "deploy_form", None)
    if make is None:
        return model
    deployed = make()
    height, width = getattr(model, "input_size", (64, 64))
    probe = torch.rand(1, 3, int(height), int(width)) * 255.0
    with torch.no_grad():
        diff = (deployed(probe) - model(probe)).abs().max().item()
    if not diff <= 1e-3:
        raise ValueError(f"deploy_form changed the model's output (max abs diff {diff:.3g})")
    return deployed


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
    if dynamic_batch and batch_size < MIN_EXAMPLE_BATCH:
        raise ValueError(f"export_onnx: a dynamic batch needs an example batch_size >= "
                         f"{MIN_EXAMPLE_BATCH}")
    model = model.eval()
    # A static export keeps the caller's batch size exactly (example_input would pad 1 to 2).
    example = example_input(input_size, batch_size)[:batch_size]
    if exporter in ("dynamo", "auto"):
        try:
            _export_dynamo(model, example, path, dynamic_batch, opset)
            _stamp(path, "dynamo")
            return path
        except Exception as exc:
            if exporter == "dynamo":
                raise
            log.warning("dynamo ONNX export failed (%s); falling back to the legacy exporter",
                        one_line(exc))
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
                   batch_is_dynamic: bool, opset: int) -> None:
    dynamic_shapes = dynamic_batch(example)[1] if batch_is_dynamic else None
    with torch.no_grad():
        torch.onnx.export(
            model, (example,), str(path),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset,
            # One self-contained file: the quantizers and our artifact loader expect that.
            external_data=False, verbose=False,
        )


def _export_legacy(model: torch.nn.Module, example: torch.Tensor, path: Path,
                   batch_is_dynamic: bool, opset: int) -> None:
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if batch_is_dynamic else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # we chose it knowingly
        torch.onnx.export(
            model, (example,), str(path),
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamo=False, dynamic_axes=axes, opset_version=opset,
        )

