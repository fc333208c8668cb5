"""torch.export / PT2E int8 / torch.compile helpers shared by the PyTorch-family backends.

Why this is core and not a plugin: everything here is PyTorch's own machinery — ``torch.export``,
the PT2E quantization flow (torchao's ``X86InductorQuantizer`` is its x86 quantizer, imported
only inside the functions that quantize) and ``torch.compile``'s default compiler — which the
core depends on anyway (the accelerate stage keeps the compiler's cache in the run folder, see
:func:`compiler_cache`). Several backend plugins build on it (eager, compiled, PT2E int8 and
third-party quantizers that emit the same Q/DQ graphs), and a plugin importing another plugin
would make one backend depend on another being installed. Nothing here names a backend.

* :func:`export_raw` — ``torch.export`` of the raw-output model with a dynamic batch dimension.
* :func:`quantize_pt2e` — static int8 PT2E: export → ``X86InductorQuantizer`` (per-channel
  weights, per-tensor uint8 activations) → calibrate on real images → ``convert_pt2e``.
  Quantizers with their own prepare/convert build the same kind of graph and share
  :func:`calibrate`, :func:`output_tail_modules` and :func:`quantization_details`.
* :func:`compile_frozen` — ``torch.compile`` with inductor freezing, optionally channels_last
  and bf16 autocast; the int8 graphs only become fast int8 kernels through this step.
* :func:`save_program` / :func:`load_program` — the portable artifact payload (``model.pt2``);
  :func:`program_saver` is the ``AcceleratedModel.save`` that writes it.

Global torch state is never left changed: the inductor ``freezing`` flag is set with
``torch._inductor.config.patch`` around *each* call of the compiled function (compilation is
lazy and a new batch size recompiles, so patching only the ``torch.compile`` call would not be
enough; ``torch.compile(options={"freezing": True})`` does not reach the quantization passes and
fails on ``onednn.qconv_prepack`` in torch 2.13).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import types
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from accelcore.inference.export import dynamic_batch, example_input

PROGRAM_FILE = "model.pt2"


def export_raw(model: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of an eval-mode raw-output model; the batch dimension stays dynamic."""
    example, dynamic_shapes = dynamic_batch(example)
    with torch.no_grad():
        return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)


def save_program(module: torch.nn.Module | torch.export.ExportedProgram, example: torch.Tensor,
                 folder: Path) -> Path:
    """Write ``folder/model.pt2`` (an ExportedProgram; re-exported if given a module)."""
    program = module if isinstance(module, torch.export.ExportedProgram) else export_raw(
        module, example)
    path = Path(folder) / PROGRAM_FILE
    torch.export.save(program, str(path))
    return path


def program_saver(module: torch.nn.Module | torch.export.ExportedProgram,
                  input_size: tuple[int, int] | list[int]) -> Callable[[Path], None]:
    """``AcceleratedModel.save`` writing ``module`` as ``model.pt2`` (exported at save time)."""
    def save(folder: Path) -> None:
        save_program(module, example_input(input_size), folder)

    return save


def load_program(folder: Path) -> torch.nn.Module:
    """Load ``folder/model.pt2`` back as a callable module (int8 graphs need torchao's ops)."""
    path = Path(folder) / PROGRAM_FILE
    if not path.is_file():
        raise FileNotFoundError(f"artifact payload missing: {path}")
    with contextlib.suppress(ImportError):  # registers the quantized_decomposed/torchao ops
        import torchao.quantization.pt2e.quantize_pt2e  # noqa: F401
    sources = _fx_sources()
    before = set(sources) if sources is not None else set()
    module = torch.export.load(str(path)).module()
    if sources is not None:
        # torch.fx keeps the generated Python source of every GraphModule it ever built (for
        # tracebacks), ~0.8 MB per load of yolox_nano, never freed: each load of an artifact
        # grew the process (found by benchmarks/soak.py). Drop this load's with the module.
        added = [key for key in sources if key not in before]
        release = weakref.finalize(module, _forget_fx_sources, added)
        release.atexit = False
    return module


def _fx_sources() -> dict[str, str] | None:
    """torch.fx's cache of generated GraphModule sources (None if this torch has none)."""
    from torch.fx import graph_module

    cache = getattr(getattr(graph_module, "_loader", None), "eval_cache", None)
    return cache if isinstance(cache, dict) else None


def _forget_fx_sources(keys: list[str]) -> None:
    import linecache

    sources = _fx_sources()
    for key in keys:
        if sources is not None:
            sources.pop(key, None)
        linecache.cache.pop(key, None)


_CONV_TARGETS = ("aten.conv2d", "aten.convolution", "aten._convolution")


def _module_path(node: torch.fx.Node) -> str | None:
    """Qualified name of the innermost module that produced ``node`` ("head.cls_preds.0")."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = str(list(stack.values())[-1][0])
    for prefix in ("L['self'].", "L__self__."):
        path = path.removeprefix(prefix)
    return path.replace("[", ".").replace("]", "").replace("'", "")


def output_tail_modules(program: torch.export.ExportedProgram | torch.fx.GraphModule
                        ) -> list[str]:
    """The convolutions that feed the graph output directly (through reshapes, concats,
    permutes — anything but another convolution), as module names.

    These are the detector's predictor convs: quantized, their outputs would share one 8-bit
    scale across box offsets, objectness and class logits (graph backends apply the same rule
    to their own graphs).
    """
    graph = getattr(program, "graph_module", program).graph
    output = next(n for n in graph.nodes if n.op == "output")
    names: list[str] = []
    seen: set[torch.fx.Node] = set()
    stack = list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if str(node.target).startswith(_CONV_TARGETS):
            path = _module_path(node)
            if path and path not in names:
                names.append(path)
            continue
        stack.extend(node.all_input_nodes)
    return sorted(names)


ACTIVATION_OBSERVERS = ("minmax", "histogram")


def default_quantizer(reduce_range: bool = False,
                      fp32_modules: list[str] | tuple[str, ...] = (),
                      observer: str = "minmax") -> Any:
    """``X86InductorQuantizer`` with per-channel symmetric int8 weights, uint8 activations.

    ``reduce_range`` gives 7-bit activations. Without VNNI/AMX oneDNN's u8×s8 kernels add pairs
    of products in int16, which can saturate with full-range activations; 7 bits avoid that
    but halve the resolution. Measured on this AVX2 machine (shipped yolox_nano, 64 val images,
    this quantizer compiled by inductor, predictor convs fp32, minmax ranges): 8-bit AP50:95
    0.5885, 7-bit 0.5638, fp32 0.5922 — so 8 bits by default. ``fp32_modules`` (module names)
    are left unquantized; ``observer`` sets how activation ranges are calibrated: "minmax" (the
    full observed range, as Intel Neural Compressor does) or "histogram" (torchao's default,
    clips outliers to minimise the L2 error).
    """
    import dataclasses

    import torchao.quantization.pt2e as pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    if observer not in ACTIVATION_OBSERVERS:
        raise ValueError(f"observer must be one of {ACTIVATION_OBSERVERS}, got {observer!r}")
    # The default x86 config is already per-channel for weights (PerChannelMinMaxObserver).
    config = xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range)
    if observer == "minmax":
        activation = dataclasses.replace(
            config.input_activation,
            observer_or_fake_quant_ctr=pt2e.MinMaxObserver.with_args(eps=2**-12))
        config = dataclasses.replace(config, input_activation=activation,
                                     output_activation=activation)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(config)
    for name in fp32_modules:
        quantizer.set_module_name_qconfig(name, None)
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
                  reduce_range: bool = False, fp32_output_convs: bool = True,
                  observer: str = "minmax") -> tuple[torch.nn.Module, dict]:
    """Static int8 PT2E of the raw-output model; returns (converted module, details).

    ``fp32_output_convs`` keeps :func:`output_tail_modules` in float32. The converted module
    is a Q/DQ reference graph: correct but slow until :func:`compile_frozen` fuses it into
    int8 oneDNN kernels.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    program = export_raw(model, example)
    keep = output_tail_modules(program) if fp32_output_convs else []
    prepared = prepare_pt2e(program.module(), default_quantizer(reduce_range, keep, observer))
    images = calibrate(prepared, calibration)
    converted = convert_pt2e(prepared)
    return converted, quantization_details(images, reduce_range, keep, observer)


def quantization_details(images: int, reduce_range: bool, fp32_modules: list[str],
                         observer: str) -> dict:
    """What a static int8 method did, for the report (shared by the PT2E backends)."""
    return {"calibration_images": images, "reduce_range": reduce_range,
            "weights": "int8 per-channel symmetric",
            "activations": f"uint8 per-tensor affine ({observer} ranges"
                           + (", 7-bit)" if reduce_range else ")"),
            "fp32_modules": fp32_modules}


@contextlib.contextmanager
def compiler_cache(default_dir: Path | None = None) -> Iterator[Path]:
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


def compile_frozen(module: torch.nn.Module, *, bf16: bool = False,
                     channels_last: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """Compile ``module`` with inductor (freezing on); returns ``forward(images) -> float32``.

    Compilation happens on the first call (do a warm-up call to include it in a conversion
    time). ``bf16`` runs the graph under bf16 autocast; ``channels_last`` converts the weights
    and the input to NHWC, which the CPU conv kernels prefer.
    """
    run = _own_code(_precision_call(module, bf16=bf16, channels_last=channels_last))

    # dynamic=False: one specialised graph per batch size; a dynamic-shape compile of the same
    # model took ~5-10x longer here and is not needed for fixed-batch serving.
    compiled = torch.compile(run, dynamic=False)
    generated: list[Any] = []  # inductor's wrapper modules built for this forward
    sources: list[str] = []  # torch.fx sources of the graphs compiling it built

    def forward(images: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config as inductor_config

        modules, fx = _generated_modules(), _fx_sources()
        count = len(modules) if modules is not None else 0
        fx_count = len(fx) if fx is not None else 0
        # inference_mode always (not no_grad): the compiled code is guarded on it, so callers
        # with and without inference_mode would otherwise compile twice.
        with inductor_config.patch(freezing=True), torch.inference_mode():
            out = compiled(images)
        if modules is not None and len(modules) > count:  # this call compiled
            generated.extend(modules[count:])
        if fx is not None and len(fx) > fx_count:
            sources.extend(list(fx)[fx_count:])  # dicts keep insertion order
        return out

    release = weakref.finalize(forward, _release_compiled, run.__code__, generated, sources)
    release.atexit = False  # nothing to free at interpreter exit
    return forward


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own.

    Dynamo keeps compiled graphs in a cache on the *code object*, which every closure made by
    :func:`_precision_call` shares: each artifact loaded in one process added a cache entry (and
    its frozen weights) that was never freed, and from the ninth one on dynamo hit its recompile
    limit and silently ran the model eagerly (found by ``benchmarks/soak.py``). A private code
    object gives each compiled forward its own cache, dropped with it (:func:`_release_compiled`).
    """
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)


def _generated_modules() -> list[Any] | None:
    """Inductor's list of the Python wrapper modules it generated (each holds its graph's frozen
    constants); None if this torch version keeps none."""
    try:
        from torch._inductor.codecache import PyCodeCache
    except ImportError:
        return None
    modules = getattr(PyCodeCache, "modules", None)
    return modules if isinstance(modules, list) else None


def _release_compiled(code: Any, generated: list[Any], sources: list[str]) -> None:
    """Free what a released compiled forward left in process-wide caches: dynamo's entries on
    its code object, inductor's references to the modules holding its frozen constants and
    torch.fx's copies of the generated graph sources."""
    reset_code = getattr(torch._dynamo, "reset_code", None)
    if reset_code is not None:
        reset_code(code)
    modules = _generated_modules()
    if modules is not None and generated:
        ours = {id(m) for m in generated}
        modules[:] = [m for m in modules if id(m) not in ours]
        for module in generated:
            if sys.modules.get(module.__name__) is module:
                del sys.modules[module.__name__]
    generated.clear()
    _forget_fx_sources(sources)
    # ShapeEnv memoises some methods with class-level unbounded lru_caches keyed by the
    # instance: every compile's shape environment (and the ~1000 fake tensors it tracks) would
    # stay reachable forever (~5 MB per yolox_nano compile). Pure memoisation: safe to clear.
    try:
        from torch.fx.experimental.symbolic_shapes import ShapeEnv
    except ImportError:
        return
    for attribute in vars(ShapeEnv).values():
        clear = getattr(attribute, "cache_clear", None)
        if callable(clear):
            clear()


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


class PrecisionModule(torch.nn.Module):
    """``module`` called in the requested layout/precision, output cast back to float32
    (shared by the eager, the just-in-time and the ahead-of-time compiled paths).

    ``channels_last`` converts the weights (in place, once) and each input to NHWC; ``bf16``
    runs the module under bf16 autocast.
    """

    def __init__(self, module: torch.nn.Module, *, bf16: bool, channels_last: bool) -> None:
        super().__init__()
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.inner = module
        self.bf16, self.channels_last = bf16, channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.inner(images).float()
        return self.inner(images).float()


def _precision_call(module: torch.nn.Module, *, bf16: bool,
                    channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """A plain function calling :class:`PrecisionModule` (dynamo caches per function code)."""
    wrapped = PrecisionModule(module, bf16=bf16, channels_last=channels_last)

    def run(images: torch.Tensor) -> torch.Tensor:
        return wrapped(images)

    return run
