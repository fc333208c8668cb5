"""Intel Extension for PyTorch (IPEX) backend plugin and ``train.use_ipex`` training hook.

IPEX is discontinued after 2.8.0 and only works with torch 2.8.*: on any other torch, importing
it prints "needs to work with PyTorch 2.8.*" and exits the process. So this module never imports
it at declare time, and imports it at all only after package metadata shows a matching torch.
In the main environment (torch 2.13) every method is declared unavailable with the reason; the
IPEX environment (``scripts/make_ipex_env.sh``) runs them for real.

Methods: ``fp32_ipex`` (ipex.optimize), ``bf16_ipex`` (ipex.optimize bf16 + autocast),
``jit_fp32_ipex`` (ipex.optimize + jit trace + freeze), ``jit_fp32_ipex_channels_last``.
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import pluggy

from accelcore.errors import BackendUnavailable
from accelcore.inference.lazy_backend import LazyBackend
from accelcore.interfaces import AcceleratedModel, AccelerateRequest, Declaration

hookimpl = pluggy.HookimplMarker("accelcore")

IPEX_DIST = "intel-extension-for-pytorch"
TRAINING_OPTION = "use_ipex"
STOCK_PATH = ("use the stock-PyTorch path instead: train.compile: true + train.precision: bf16 "
              "(or run in the IPEX environment built by scripts/make_ipex_env.sh)")

METHODS: dict[str, str] = {
    "fp32_ipex": "IPEX ipex.optimize, fp32",
    "bf16_ipex": "IPEX ipex.optimize bf16 weights + bf16 autocast",
    "jit_fp32_ipex": "IPEX ipex.optimize fp32 + TorchScript trace + freeze",
    "jit_fp32_ipex_channels_last": "IPEX ipex.optimize fp32 + trace + freeze, channels_last",
}
# IPEX's bf16 weight prepack asserts on these CPU features (measured: it refuses on AVX2-only).
BF16_ISA = ({"avx512bw", "avx512vl", "avx512dq"}, {"avx_ne_convert"})


def _release(version: str) -> str:
    return version.split("+", 1)[0]


def ipex_status() -> str:
    """Why IPEX cannot run in this environment ('' if it can). Metadata only, no import."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"IPEX needs an x86-64 CPU, this is {platform.machine()}"
    try:
        ipex_version = importlib.metadata.version(IPEX_DIST)
    except importlib.metadata.PackageNotFoundError:
        return (f"{IPEX_DIST} not installed (it needs torch 2.8: build the IPEX environment "
                f"with scripts/make_ipex_env.sh)")
    torch_version = importlib.metadata.version("torch")
    need = ".".join(_release(ipex_version).split(".")[:2])
    have = ".".join(_release(torch_version).split(".")[:2])
    if need != have:
        return (f"IPEX {_release(ipex_version)} needs torch {need}.*, "
                f"found {_release(torch_version)}")
    return ""


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_status() -> str:
    """Why IPEX bf16 cannot run on this CPU ('' if it can)."""
    flags = cpu_flags()
    if any(need <= flags for need in BF16_ISA):
        return ""
    return ("IPEX bf16 weight prepack needs avx512bw+avx512vl+avx512dq or avx_ne_convert; "
            "this CPU has neither (IPEX refuses bf16 here)")


def method_status(method: str) -> str:
    reason = ipex_status()
    if not reason and method == "bf16_ipex":
        reason = bf16_status()
    return reason


BACKEND = LazyBackend(METHODS, method_status, "accelcore_ipex.backend")


@hookimpl
def accelcore_declare() -> list[Declaration]:
    decls = BACKEND.declarations()
    reason = ipex_status()
    decls.append(Declaration(
        kind="backend", name=TRAINING_OPTION,
        summary="train.use_ipex: ipex.optimize(model, optimizer) before training (fp32 or bf16)",
        available=not reason, reason=reason))
    return decls


@hookimpl
def accelcore_accelerate(method: str, model: Any,
                         request: AccelerateRequest) -> AcceleratedModel | None:
    return BACKEND.accelerate(method, model, request)


@hookimpl
def accelcore_load_artifact(method: str, folder: Path, manifest: dict) -> AcceleratedModel | None:
    return BACKEND.load(method, folder)


@hookimpl
def accelcore_prepare_training(model: Any, optimizer: Any, config: Any) -> tuple | None:
    if not getattr(config, "use_ipex", False):
        return None
    precision = str(getattr(config, "precision", "32"))
    reason = ipex_status()
    if not reason and precision not in ("32", "bf16"):
        reason = f"IPEX trains in precision 32 or bf16, not {precision}"
    if not reason and precision == "bf16":
        reason = bf16_status()
    if reason:
        raise BackendUnavailable(f"train.use_ipex: {reason}; {STOCK_PATH}")
    from accelcore_ipex import backend

    return backend.prepare_training(model, optimizer, precision)
