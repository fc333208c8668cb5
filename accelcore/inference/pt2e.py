"""torch.export / PT2E int8 / inductor helpers shared by the PyTorch-family backends.

* :func:`export_raw` — ``torch.export`` of the raw-output model with a dynamic batch dimension.
* :func:`quantize_pt2e` — static int8 PT2E: export → ``X86InductorQuantizer`` (per-channel
  weights, per-tensor uint8 activations) → calibrate on real images → ``convert_pt2e``.
  ``inductor_int8`` calls it directly; ``int8`` (Intel Neural Compressor) runs INC's own
  prepare/convert, which builds the same kind of graph.
* :func:`compile_inductor` — ``torch.compile`` with inductor freezing, optionally channels_last
  and bf16 autocast; the int8 graphs only become fast int8 kernels through this step.
* :func:`save_program` / :func:`load_program` — the portable artifact payload (``model.pt2``).

Global torch state is never left changed: the inductor ``freezing`` flag is set with
``torch._inductor.config.patch`` around *each* call of the compiled function (compilation is
lazy and a new batch size recompiles, so patching only the ``torch.compile`` call would not be
enough; ``torch.compile(options={"freezing": True})`` does not reach the quantization passes and
fails on ``onednn.qconv_prepack`` in torch 2.13).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

PROGRAM_FILE = "model.pt2"
# torch.export needs an example batch >= 2, else it specialises the batch dim to a constant.
_MIN_EXPORT_BATCH = 2


def example_input(input_size: tuple[int, int] | list[int], batch_size: int = 2) -> torch.Tensor:
    """A deterministic image-like float32 batch (0-255) for tracing/export only."""
    h, w = int(input_size[0]), int(input_size[1])
    gen = torch.Generator().manual_seed(0)
    return torch.rand(max(_MIN_EXPORT_BATCH, batch_size), 3, h, w, generator=gen) * 255.0


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def export_raw(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of an eval-mode raw-output model; the batch dimension stays dynamic."""
    if example.shape[0] < _MIN_EXPORT_BATCH:
        example = example.expand(_MIN_EXPORT_BATCH, *example.shape[1:]).contiguous()
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=_dynamic_batch())


def save_program(module: torch.nn.Module | torch.export.ExportedProgram, example: torch.Tensor,
                 folder: Path) -> Path:
    """Write ``folder/model.pt2`` (an ExportedProgram; re-exported if given a module)."""
    program = module if isinstance(module, torch.export.ExportedProgram) else export_raw(
        module, example)
    path = Path(folder) / PROGRAM_FILE
    torch.export.save(program, str(path))
    return path


def load_program(folder: Path) -> torch.nn.Module:
    """Load ``folder/model.pt2`` back as a callable module (int8 graphs need torchao's ops)."""
    path = Path(folder) / PROGRAM_FILE
    if not path.is_file():
        raise FileNotFoundError(f"artifact payload missing: {path}")
    with contextlib.suppress(ImportError):  # registers the quantized_decomposed/torchao ops
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    return torch.export.load(str(path)).module()


def default_quantizer(reduce_range: bool | None = None) -> Any:
    """``X86InductorQuantizer`` with per-channel symmetric int8 weights, uint8 activations.

    ``reduce_range=None`` decides from the CPU: without VNNI/AMX, oneDNN's u8×s8 kernels add
    pairs of products in int16 with saturation, so activations use 7 bits there.
    """
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    from accelcore.inference.latency import has_int8_dot_product

    if reduce_range is None:
        reduce_range = not has_int8_dot_product()
    quantizer = xiq.X86InductorQuantizer()
    # The default x86 config is already per-channel for weights (PerChannelMinMaxObserver).
    quantizer.set_global(
        xiq.get_default_x86_inductor_quantization_config(reduce_range=bool(reduce_range)))
    return quantizer


def calibrate(prepared: Callable[[torch.Tensor], Any],
              calibration: Callable[[], Iterator[torch.Tensor]] | None) -> int:
    """Run the prepared model over every calibration batch; returns the image count."""
    if calibration is None:
        raise ValueError("static int8 needs calibration images (AccelerateRequest.calibration)")
    seen = 0
    with torch.no_grad():
        for batch in calibration():
            prepared(batch)
            seen += int(batch.shape[0])
    if seen == 0:
        raise ValueError("calibration yielded no images")
    return seen


def quantize_pt2e(model: torch.nn.Module, example: torch.Tensor,
                  calibration: Callable[[], Iterator[torch.Tensor]] | None,
                  reduce_range: bool | None = None) -> tuple[torch.nn.Module, dict]:
    """Static int8 PT2E of the raw-output model; returns (converted module, details).

    The converted module is a Q/DQ reference graph: correct but slow until
    :func:`compile_inductor` fuses it into int8 oneDNN kernels.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from accelcore.inference.latency import has_int8_dot_product

    if reduce_range is None:
        reduce_range = not has_int8_dot_product()
    program = export_raw(model, example)
    prepared = prepare_pt2e(program.module(), default_quantizer(reduce_range))
    images = calibrate(prepared, calibration)
    converted = convert_pt2e(prepared)
    return converted, {"calibration_images": images, "reduce_range": bool(reduce_range),
                       "weights": "int8 per-channel symmetric",
                       "activations": "uint8 per-tensor affine" + (" (7-bit)" if reduce_range
                                                                   else "")}


@contextlib.contextmanager
def inductor_cache(default_dir: Path | None = None) -> Iterator[Path]:
    """Use ``TORCHINDUCTOR_CACHE_DIR`` if set, else ``default_dir`` (or a temp dir), for the block.

    Inductor reads the variable when it writes/reads kernels, so setting it for the block only
    keeps generated code inside the run folder without touching other code in the process.
    """
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        yield Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        return
    with contextlib.ExitStack() as stack:
        if default_dir is None:
            default_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="accelcore-inductor-")))
        Path(default_dir).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(default_dir)
        try:
            yield Path(default_dir)
        finally:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def compile_inductor(module: torch.nn.Module, *, bf16: bool = False,
                     channels_last: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """Compile ``module`` with inductor (freezing on); returns ``forward(images) -> float32``.

    Compilation happens on the first call (do a warm-up call to include it in a conversion
    time). ``bf16`` runs the graph under bf16 autocast; ``channels_last`` converts the weights
    and the input to NHWC, which the CPU conv kernels prefer.
    """
    run = _precision_call(module, bf16=bf16, channels_last=channels_last)

    # dynamic=False: one specialised graph per batch size; a dynamic-shape compile of the same
    # model took ~5-10x longer here and is not needed for fixed-batch serving.
    compiled = torch.compile(run, dynamic=False)

    def forward(images: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config as inductor_config

        # inference_mode always (not no_grad): the compiled code is guarded on it, so callers
        # with and without inference_mode would otherwise compile twice.
        with inductor_config.patch(freezing=True), torch.inference_mode():
            return compiled(images)

    return forward


def reset_compiler_state() -> None:
    """Drop dynamo's compiled-code caches (used between methods run in one process)."""
    torch._dynamo.reset()


def eager_forward(module: torch.nn.Module, *, bf16: bool = False,
                  channels_last: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """Eager ``forward(images) -> float32`` with optional bf16 autocast and channels_last.

    Autocast and inference mode are entered per call, so nothing leaks into the caller.
    """
    run = _precision_call(module, bf16=bf16, channels_last=channels_last)

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return run(images)

    return forward


def _precision_call(module: torch.nn.Module, *, bf16: bool,
                    channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` called in the requested layout/precision, output cast back to float32
    (shared by the eager and the compiled paths)."""
    if channels_last:
        module = module.to(memory_format=torch.channels_last)

    def run(images: torch.Tensor) -> torch.Tensor:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return module(images).float()
        return module(images).float()

    return run
