"""IPEX conversions and training preparation; imported only after ``ipex_status()`` said
torch and IPEX match."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from accelcore.errors import BackendUnavailable
from accelcore.inference.export import example_input
from accelcore.interfaces import AcceleratedModel, AccelerateRequest

EAGER_FILE = "model.pth"  # the raw-mode eager module; ipex.optimize is re-applied on load
JIT_FILE = "model.pt"  # the frozen TorchScript graph (IPEX fused ops inside)
SETTINGS_JSON = "ipex.json"


def _ipex() -> Any:
    try:
        import intel_extension_for_pytorch as ipex
    except (ImportError, OSError, SystemExit) as exc:  # IPEX calls exit() on a torch mismatch
        raise BackendUnavailable(f"cannot import intel_extension_for_pytorch: {exc}") from None
    return ipex


def _optimize(ipex: Any, model: torch.nn.Module, dtype: torch.dtype, **kwargs: Any) -> Any:
    try:
        return ipex.optimize(model, dtype=dtype, **kwargs)
    except AssertionError as exc:  # IPEX reports unsupported ISA / dtype combinations this way
        raise BackendUnavailable(f"ipex.optimize refused: {exc}") from None


def accelerate(method: str, model: torch.nn.Module,
               request: AccelerateRequest) -> AcceleratedModel:
    # Trace at batch >= 2; a frozen trace of this convolutional net runs any batch size.
    example = example_input(request.input_size, min(request.batch_size, 4))
    eager = copy.deepcopy(model).eval()  # the caller's model stays untouched
    return _build(method, eager, example)


def load(method: str, folder: Path, manifest: dict) -> AcceleratedModel:
    ipex = _ipex()  # registers IPEX's TorchScript ops before the graph is loaded
    settings = json.loads((folder / SETTINGS_JSON).read_text())
    if method.startswith("jit_"):
        traced = torch.jit.load(str(folder / JIT_FILE))
        forward = _jit_forward(traced, settings["channels_last"])
        return AcceleratedModel(method=method, precision="fp32", forward=forward,
                                save=_jit_saver(traced, settings),
                                details={**_details(ipex, settings), "loaded_from": str(folder)})
    # Our own artifact: the pickled eager module (needs the model's plugin importable).
    eager = torch.load(folder / EAGER_FILE, weights_only=False)
    example = example_input(settings["input_size"])
    built = _build(method, eager.eval(), example)
    built.details["loaded_from"] = str(folder)
    return built


def _build(method: str, eager: torch.nn.Module, example: torch.Tensor) -> AcceleratedModel:
    ipex = _ipex()
    channels_last = method.endswith("_channels_last")
    settings = {"method": method, "channels_last": channels_last,
                "input_size": list(example.shape[-2:])}
    if method in ("fp32_ipex", "bf16_ipex"):
        bf16 = method == "bf16_ipex"
        optimized = _optimize(ipex, copy.deepcopy(eager),
                              torch.bfloat16 if bf16 else torch.float32, inplace=True)

        @torch.no_grad()
        def forward(images: torch.Tensor) -> torch.Tensor:
            context = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                       else contextlib.nullcontext())
            with context:
                out = optimized(images)
            return out.float()

        def save(folder: Path) -> None:
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            torch.save(eager, folder / EAGER_FILE)
            (folder / SETTINGS_JSON).write_text(json.dumps(settings, indent=2))

        return AcceleratedModel(method=method, precision="bf16" if bf16 else "fp32",
                                forward=forward, save=save, details=_details(ipex, settings))

    # jit_fp32_ipex / jit_fp32_ipex_channels_last
    model = copy.deepcopy(eager)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        example = example.contiguous(memory_format=torch.channels_last)
    optimized = _optimize(ipex, model, torch.float32, inplace=True)
    with torch.no_grad():
        traced = torch.jit.freeze(torch.jit.trace(optimized, example, check_trace=False))
        # The profiling executor specialises and fuses on the first calls: do them now.
        for _ in range(2):
            traced(example)
    forward = _jit_forward(traced, channels_last)
    return AcceleratedModel(method=method, precision="fp32", forward=forward,
                            save=_jit_saver(traced, settings), details=_details(ipex, settings))


def _jit_forward(traced: Any, channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    @torch.no_grad()
    def forward(images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images, dtype=torch.float32)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return traced(images).float().contiguous()

    return forward


def _jit_saver(traced: Any, settings: dict) -> Callable[[Path], None]:
    def save(folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        torch.jit.save(traced, str(folder / JIT_FILE))
        (folder / SETTINGS_JSON).write_text(json.dumps(settings, indent=2))

    return save


def _details(ipex: Any, settings: dict) -> dict:
    return {"ipex": ipex.__version__, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "channels_last": settings["channels_last"], "threads": torch.get_num_threads()}


def prepare_training(model: torch.nn.Module, optimizer: Any, precision: str) -> tuple:
    """``ipex.optimize`` for training: fused/prepacked ops and an IPEX-aware optimizer."""
    ipex = _ipex()
    model.train()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return _optimize(ipex, model, dtype, optimizer=optimizer)
