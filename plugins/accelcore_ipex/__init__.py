"""Intel Extension for PyTorch (IPEX): four inference methods and the training feature ``ipex``.

IPEX is discontinued after 2.8.0 and only works with torch 2.8.*: on any other torch, importing
it prints "needs to work with PyTorch 2.8.*" and exits the process. So this module never imports
it at declare time, and imports it at all only after package metadata shows a matching torch.
In the main environment (torch 2.13) every method and the feature are declared unavailable with
the reason; the IPEX environment (``scripts/make_ipex_env.sh``) runs them for real.

Methods: ``fp32_ipex`` (ipex.optimize), ``bf16_ipex`` (ipex.optimize bf16 + autocast),
``jit_fp32_ipex`` (ipex.optimize + jit trace + freeze), ``jit_fp32_ipex_channels_last``.
Training: ``train.features: [ipex]`` runs ``ipex.optimize(model, optimizer)`` before training
(precision 32 or bf16); it takes no ``train.options``.
"""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

from accelcore import hookimpl
from accelcore.backend import Backend, Method
from accelcore.errors import BackendUnavailable, RecipeError
from accelcore.interfaces import Declaration
from accelcore.machine import cpu_flags, has_native

IPEX_DIST = "intel-extension-for-pytorch"
FEATURE = "ipex"
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


def unavailable_training(reason: str) -> str:
    """``reason`` and what to use instead of the ``ipex`` training feature, honest about this
    CPU's bf16."""
    hint = ("use train.compile: true with train.precision: bf16 instead (fused kernels through "
            "torch.compile/inductor)")
    if "make_ipex_env.sh" not in reason:
        hint += ", or run in the IPEX environment built by scripts/make_ipex_env.sh"
    flags = cpu_flags()
    if flags and not has_native("bf16", flags):  # emulated bf16 is slower than fp32
        hint += ("; note this CPU has no bf16 hardware, so here prefer train.precision: 32 with "
                 "train.channels_last: true (optionally train.compile: true)")
    return f"{reason}; {hint}"


class IpexBackend(Backend):
    methods = {
        "fp32_ipex": Method("IPEX ipex.optimize, fp32", "fp32"),
        "bf16_ipex": Method("IPEX ipex.optimize bf16 weights + bf16 autocast", "bf16"),
        "jit_fp32_ipex": Method("IPEX ipex.optimize fp32 + TorchScript trace + freeze", "fp32"),
        "jit_fp32_ipex_channels_last": Method(
            "IPEX ipex.optimize fp32 + trace + freeze, channels_last", "fp32"),
    }
    packages = (IPEX_DIST,)
    runtime = "accelcore_ipex.backend"

    def unavailable(self, method: str) -> str:
        return method_status(method)

    def declarations(self) -> list[Declaration]:
        reason = ipex_status()
        feature = Declaration(
            "feature", FEATURE, "ipex.optimize(model, optimizer) before training (precision 32 "
            "or bf16)", available=not reason,
            reason=unavailable_training(reason) if reason else "", packages=self.packages)
        return [*super().declarations(), feature]

    @hookimpl
    def accelcore_prepare_training(self, model: Any, optimizer: Any, config: Any) -> tuple | None:
        if FEATURE not in (getattr(config, "features", None) or ()):
            return None
        options = (getattr(config, "options", None) or {}).get(FEATURE)
        if options:
            raise RecipeError(f"train.options.{FEATURE}: the ipex feature takes no options, "
                              f"got {sorted(options)}")
        precision = str(getattr(config, "precision", "32"))
        reason = ipex_status()
        if not reason and precision not in ("32", "bf16"):
            reason = f"IPEX trains in precision 32 or bf16, not {precision}"
        if not reason and precision == "bf16":
            reason = bf16_status()
        if reason:
            raise BackendUnavailable(f"train.features: {FEATURE}: {unavailable_training(reason)}")
        from accelcore_ipex import backend

        return backend.prepare_training(model, optimizer, precision)


plugin = IpexBackend()
