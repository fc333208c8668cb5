"""2x2 space-to-depth for training inputs (``space_to_depth.cpp``).

Why: a Focus-style stem (YOLOX) turns each 2x2 pixel block into channels with ``torch.cat`` of
four strided slices of the image batch. On channels_last input that is four generic copies of
three-value pieces: 48 ms per batch of 64 at 416 px on a 2-core Zen 4 in fp32 and in bf16 alike,
plus, under bf16 autocast, a cast of the result before the first convolution. The kernel does
both in one pass. Where it does not apply (a gradient is wanted for the input, NCHW or odd sizes,
not float32, under ``torch.compile`` or tracing, the kernel cannot be built,
``ACCELCORE_NATIVE_SPACE_TO_DEPTH=0``) the result is the same ``torch.cat``.
"""

from __future__ import annotations

from typing import Any

import torch

from accelcore.training import native

SWITCH_ENV = "ACCELCORE_NATIVE_SPACE_TO_DEPTH"


def extension() -> Any | None:
    """The compiled kernel module, built on first call (None if it cannot be built here)."""
    return native.build("space_to_depth")


def _autocast_bfloat16(x: torch.Tensor) -> bool:
    return (torch.is_autocast_enabled(x.device.type)
            and torch.get_autocast_dtype(x.device.type) == torch.bfloat16)


def _native_applies(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32
            and not (x.requires_grad and torch.is_grad_enabled())
            and x.is_contiguous(memory_format=torch.channels_last)
            and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch.jit.is_scripting() and native.switched_on(SWITCH_ENV)
            and extension() is not None)


def space_to_depth(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W] -> [N, 4C, H/2, W/2]``: the pixels of each 2x2 block stacked on channels in
    the order top-left, bottom-left, top-right, bottom-right (YOLOX's Focus), C values each.

    Under CPU bf16 autocast the native path returns bfloat16 — the input the next convolution
    would cast it to (round to nearest even), so the result is the same.
    """
    if _native_applies(x):
        return extension().space_to_depth(x, _autocast_bfloat16(x))
    return stacked_slices(x)


def stacked_slices(x: torch.Tensor) -> torch.Tensor:
    """The same blocks from plain ops (four strided slices and a concat): what every exporter
    traces, and the one place the channel order is written."""
    return torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]),
                     dim=1)
