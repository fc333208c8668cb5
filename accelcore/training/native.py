"""The project's C++ kernels, compiled for the CPU they run on.

A kernel ``<name>.cpp`` next to this module (or in the directory its caller names: the data
package's HSV kernel) is built on first use with
``torch.utils.cpp_extension`` (cached under ``TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions/accelcore``; about a minute once) with
``-march=native``, and the build is keyed by this Python, this torch and the CPU's flags, so a
machine with another instruction set builds its own.

Builds are serialised across processes with an OS file lock, which dies with its holder: torch's
own lock file outlives a build that was killed (a timeout, a lost CI machine) and would make every
later build wait on it forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from accelcore.errors import one_line
from accelcore.machine import real_cpu_flags
from accelcore.training import lean_step

log = logging.getLogger(__name__)


@functools.cache
def build(name: str, directory: Path | None = None, exact_float: bool = False) -> Any | None:
    """The compiled module of ``<name>.cpp`` in ``directory`` (default: next to this module);
    None, with one warning, if it cannot be built. ``exact_float`` compiles without fast-math
    and without fused multiply-adds, for a kernel that must round exactly as a reference does.
    """
    from torch.utils import cpp_extension

    source = (directory or Path(__file__).parent) / f"{name}.cpp"
    machine = f"{sys.version_info[:2]} {torch.__version__} {' '.join(sorted(real_cpu_flags()))}"
    key = hashlib.sha1(machine.encode()).hexdigest()[:10]
    floats = ["-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"] if exact_float else [
        "-ffast-math", *_division_flags()]
    module_name = f"accelcore_{name}_{key}"
    build_directory = extensions_root() / module_name
    try:
        with exclusive_build(build_directory):
            return cpp_extension.load(
                name=module_name, sources=[str(source)], build_directory=str(build_directory),
                extra_cflags=["-O3", "-march=native", *floats, "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no headers: the eager ops still train correctly
        log.warning("C++ kernel %s unavailable (%s); using the eager ops", name, one_line(exc))
        return None


def extensions_root() -> Path:
    """Where the kernels are built: ``TORCH_EXTENSIONS_DIR`` if set, else the user's cache."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_extensions" / "accelcore"


@contextlib.contextmanager
def exclusive_build(build_directory: Path) -> Iterator[None]:
    """Hold the build directory's OS lock; once held, torch's lock file there can only have been
    left by a killed build (every live builder holds this lock), so it is removed."""
    build_directory.mkdir(parents=True, exist_ok=True)
    with open(build_directory / "accelcore.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            (build_directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def _division_flags() -> list[str]:
    """Without AVX-512, keep divisions: -ffast-math turns a vector division into rcp + a Newton
    step, which on a 2-core Zen 3 was slower than vdivps (bn_silu.cpp's AVX2 sigmoid: ~9.5
    against ~12.5 cycles a vector). AVX-512 builds stay as they were measured."""
    return [] if "avx512f" in real_cpu_flags() else ["-mno-recip"]


def switched_on(env: str) -> bool:
    """Whether the kernel switch ``env`` is on: unless it is set to ``0`` or the whole lean
    step is switched off (:mod:`accelcore.training.lean_step`)."""
    return os.environ.get(env, "1") != "0" and lean_step.enabled()
