"""1x1 convolutions in bfloat16 training with their backward from ``pointwise_amx.cpp`` (AMX).

Why, measured on a 2-core Sapphire Rapids (yolox_nano, batch 64, 416 px, bf16 autocast +
channels_last): oneDNN's backward of the 1x1 convolutions took ~390 ms of a ~1.55 s step. For a
64 -> 64 one at 52 px its weight gradient took 9.4 ms and its input gradient 3.8 ms, where a
copy of one of those 22 MB tensors takes 2.1 ms: memory-bound work done in two slow passes. The
kernel computes both from one pass over the output gradient, and the weight gradient in float32
straight into the float32 master weight's gradient (oneDNN's is rounded to bfloat16 first).

The form ("amx_backward"): oneDNN's forward; the kernel's backward — for stride-1, unpadded,
bias-free, groups-1 1x1 convolutions computing in bfloat16 with input channels a multiple of 16
and output channels 16 or a multiple of 32, on CPUs with AMX-BF16. Like every form it is timed
against oneDNN per shape (:func:`accelcore.training.conv_forms.conv2d`) and used only where it
wins; ``ACCELCORE_AMX_1X1=0`` switches it off.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from accelcore.machine import real_cpu_flags
from accelcore.training import native
from accelcore.training.conv_forms import compute_dtype

if TYPE_CHECKING:
    from accelcore.training.conv_forms import Form

SWITCH_ENV = "ACCELCORE_AMX_1X1"


@functools.cache
def kernel() -> Any | None:
    """The backward kernel (CPUs with AMX-BF16 whose OS lets the process use it; None elsewhere
    or if it cannot be built)."""
    if not {"amx_bf16", "amx_tile"} <= real_cpu_flags():
        return None
    built = native.build("pointwise_amx")
    return built if built is not None and built.usable() else None


def _fits(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return (tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (0, 0) and conv.groups == 1 and conv.bias is None
            and conv.in_channels % 16 == 0
            and (conv.out_channels % 32 == 0 or conv.out_channels == 16)
            and compute_dtype(x) == torch.bfloat16
            and conv.weight.dtype in (torch.float32, torch.bfloat16)
            and native.switched_on(SWITCH_ENV) and kernel() is not None)


def forms(conv: nn.Conv2d, x: torch.Tensor) -> dict[str, Form]:
    """The 1x1 form of a training convolution if it applies; the caller checked
    :func:`~accelcore.training.conv_forms.trains_here`."""
    return {"amx_backward": with_kernel_backward} if _fits(conv, x) else {}


class _KernelBackward(torch.autograd.Function):
    """1x1 convolution in bfloat16: oneDNN's forward, the kernel's input and weight gradients
    (the weight's in float32, cast to the weight's dtype)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xc, wc = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        with torch.autocast("cpu", enabled=False):
            out = F.conv2d(xc, wc)
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        grad = grad.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        grad_x, grad_w = kernel().backward(grad, xc, wc)
        return (grad_x.to(x_dtype) if ctx.needs_input_grad[0] else None,
                grad_w.to(w_dtype) if ctx.needs_input_grad[1] else None)


def with_kernel_backward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` with the backward from the kernel (see :class:`_KernelBackward`)."""
    return _KernelBackward.apply(x, conv.weight)
