"""Built-in training precisions: "64", "32", "16" (fp16 autocast + GradScaler), "bf16".

Each precision is one small class (one file each); the loop drives it through the
:class:`~accelcore.interfaces.Precision` protocol and never branches on the name.
"""

from __future__ import annotations

from accelcore import hookimpl
from accelcore.interfaces import Declaration, Precision
from accelcore.machine import has_native

__version__ = "0.1.0"

NAMES = ("64", "32", "16", "bf16")


def _low_precision_note(kind: str) -> str:
    if kind == "bf16":
        return ("native (AVX512-BF16/AMX)" if has_native("bf16")
                else "emulated: no AVX512-BF16/AMX here (slow)")
    return ("native (AVX512-FP16/AMX-FP16)" if has_native("fp16")
            else "emulated: no AVX512-FP16/AMX-FP16 here")


@hookimpl
def accelcore_declare() -> list[Declaration]:
    return [
        Declaration("precision", "64", "float64 weights and math (reference / debugging)"),
        Declaration("precision", "32", "float32 (default)"),
        Declaration("precision", "16", "fp16 CPU autocast + GradScaler; "
                    + _low_precision_note("fp16")),
        Declaration("precision", "bf16", "bf16 CPU autocast, fp32 weights; "
                    + _low_precision_note("bf16")),
    ]


@hookimpl
def accelcore_precision(name: str) -> Precision | None:
    if name == "64":
        from accelcore_precision.fp64 import DoublePrecision

        return DoublePrecision()
    if name == "32":
        from accelcore_precision.fp32 import SinglePrecision

        return SinglePrecision()
    if name == "16":
        from accelcore_precision.fp16 import HalfMixedPrecision

        return HalfMixedPrecision()
    if name == "bf16":
        from accelcore_precision.bf16 import BF16MixedPrecision

        return BF16MixedPrecision()
    return None
