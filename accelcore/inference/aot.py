"""Ahead-of-time compiled artifacts (AOTInductor) for the methods compiled by inductor.

Why not only ``torch.compile`` (:func:`~accelcore.inference.pt2e.compile_frozen`): a compiled
artifact then compiles again in every process that loads it (13-30 s for yolox_nano on 2
cores), each compile leaves ~10 MB in process-wide torch state that no torch API frees (found by
``benchmarks/soak.py``), and its Python wrapper adds a few µs per kernel launch — ~6 ms per call
of yolox_nano, a third of a small batch (160 px, batch 8, one Zen 4: fp32 22.5 → 16.5 ms,
bf16 14.2 → 11.4, int8 16.7 → 9.9; at 416 px batch 64 both ran the same ~380 ms int8).

AOTInductor compiles the same graph (same inductor, freezing on, dynamic batch) once at accelerate
time into a shared library with a C++ wrapper, packed as ``compiled.pt2`` beside the portable
exported program ``model.pt2``; loading it takes milliseconds. Two limits are handled here:

* The library is machine code for the CPU and torch it was built with (inductor picks the vector
  ISA at compile time). The package records its :func:`compile_target`; where the loading
  machine differs, the artifact is compiled again from ``model.pt2`` (:func:`load_compiled`
  says why in the returned details) instead of risking an illegal instruction.
* glibc never unloads such a library (it has ``STB_GNU_UNIQUE`` symbols, which make ``dlclose``
  a no-op), so every load of a package would map another ~5 MB copy for good. Loaded packages
  are kept per process by content hash: loading the same artifact again reuses it, and memory
  grows with the number of distinct artifacts a process loads, not with the number of loads.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from accelcore.errors import one_line
from accelcore.inference.export import dynamic_batch, example_input
from accelcore.inference.pt2e import (
    PROGRAM_FILE,
    PrecisionModule,
    compile_frozen,
    load_program,
    save_program,
)
from accelcore.machine import REPORTED_FLAGS, cpu_flags

log = logging.getLogger(__name__)

PACKAGE_FILE = "compiled.pt2"
Forward = Callable[[torch.Tensor], torch.Tensor]


def compile_target() -> dict[str, Any]:
    """What a package built here runs on: torch version, inductor's vector ISA, CPU flags."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return {"torch": torch.__version__, "vec_isa": str(pick_vec_isa()) or "none",
            "cpu_flags": sorted(cpu_flags() & set(REPORTED_FLAGS))}


def target_mismatch(target: dict[str, Any] | None) -> str | None:
    """Why a package built for ``target`` must not run here (None if it may)."""
    if not target:
        return "the artifact records no compile target"
    here = compile_target()
    for key, value in here.items():
        if target.get(key) != value:
            return f"compiled for {key}={target.get(key)}, this machine has {value}"
    return None


def compile_package(module: torch.nn.Module, input_size: tuple[int, int] | list[int],
                    path: Path, *, bf16: bool = False, channels_last: bool = False) -> Path:
    """Export ``module`` (in the requested precision/layout, dynamic batch) and build its
    AOTInductor package at ``path`` with inductor freezing."""
    wrapped = PrecisionModule(module, bf16=bf16, channels_last=channels_last)
    example, dynamic_shapes = dynamic_batch(example_input(input_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.export.export(wrapped, (example,), dynamic_shapes=dynamic_shapes)
        return Path(torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs={"freezing": True}))


_LOADED: dict[str, Any] = {}
_LOADED_LOCK = threading.Lock()


def load_package(path: Path) -> Forward:
    """``forward(images)`` of the package at ``path``, loaded once per process per content."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    with _LOADED_LOCK:
        runner = _LOADED.get(digest)
        if runner is None:
            runner = torch._inductor.aoti_load_package(str(path))
            _LOADED[digest] = runner

    def forward(images: torch.Tensor) -> torch.Tensor:
        return runner(images)

    return forward


def compile_ahead(module: torch.nn.Module, input_size: tuple[int, int] | list[int],
                  work_dir: Path, *, bf16: bool = False, channels_last: bool = False
                  ) -> tuple[Forward, Callable[[Path], None], dict[str, Any]]:
    """(forward, save, details) of ``module`` compiled ahead of time.

    If AOTInductor cannot build it, the method is compiled just in time instead (the reason is
    in ``details["compiled"]``): the artifact stays usable, only its loads compile again.
    """
    package = Path(work_dir) / PACKAGE_FILE
    started = time.perf_counter()
    try:
        compile_package(module, input_size, package, bf16=bf16, channels_last=channels_last)
        forward = load_package(package)
    except Exception as exc:  # an op AOTInductor cannot lower: the JIT path still works
        log.warning("ahead-of-time compile failed (%s); compiling just in time", one_line(exc))
        package.unlink(missing_ok=True)
        info = {"mode": "jit", "reason": f"AOTInductor failed: {one_line(exc)}"}
        return (compile_frozen(module, bf16=bf16, channels_last=channels_last),
                _saver(module, input_size, None), {"compiled": info})
    info = {"mode": "aot", "target": compile_target(),
            "compile_s": round(time.perf_counter() - started, 1),
            "package_mb": round(package.stat().st_size / 1e6, 2)}
    return forward, _saver(module, input_size, package), {"compiled": info}


def load_compiled(folder: Path, details: dict[str, Any], *, bf16: bool = False,
                  channels_last: bool = False
                  ) -> tuple[Forward, Callable[[Path], None], dict[str, Any]]:
    """(forward, save, details) of a saved compiled artifact: its package where it may run
    here, else compiled again from the portable ``model.pt2`` (the reason in the details)."""
    folder = Path(folder)
    package = folder / PACKAGE_FILE
    recorded = details.get("compiled") or {}
    reason = ("the artifact has no ahead-of-time package" if not package.is_file()
              else target_mismatch(recorded.get("target")))
    if reason is None:
        return load_package(package), _copier(folder), {"compiled": recorded}
    log.info("%s: %s; compiling %s again on first call", folder, reason, PROGRAM_FILE)
    module = load_program(folder)
    return (compile_frozen(module, bf16=bf16, channels_last=channels_last),
            _copier(folder, files=(PROGRAM_FILE,)),
            {"compiled": {"mode": "jit", "reason": reason}})


def _saver(module: torch.nn.Module, input_size: tuple[int, int] | list[int],
           package: Path | None) -> Callable[[Path], None]:
    def save(folder: Path) -> None:
        save_program(module, example_input(input_size), folder)
        if package is not None:
            shutil.copyfile(package, Path(folder) / PACKAGE_FILE)

    return save


def _copier(source: Path, files: tuple[str, ...] = (PROGRAM_FILE, PACKAGE_FILE)
            ) -> Callable[[Path], None]:
    def save(folder: Path) -> None:
        for name in files:
            shutil.copyfile(source / name, Path(folder) / name)

    return save
