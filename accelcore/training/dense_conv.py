"""Dense convolutions in training with the weight gradient from ``conv_weight_grad.cpp``.

Why, measured on a 2-core AMD EPYC Zen 3 (AVX2, yolox_nano, batch 64, 416 px, float32 +
channels_last): oneDNN's weight gradient ran at 77-141 GFLOP/s for the 1x1 convolutions and
91 for the 3x3 stem (64 images of 208 px, 12 -> 16 channels: 105 ms of a 2.7 s step), against
150-180 for their forward and input gradients. The kernel reaches ~170 on the stem and
130-160 on the 1x1 convolutions with 128 or more outputs; on small ones it is no faster than
oneDNN, so, like every form, it is timed against oneDNN per shape
(:func:`accelcore.training.conv_forms.conv2d`) and used only where it wins.

The form ("weight_grad_kernel"): oneDNN's forward and input gradient, the kernel's weight
gradient — for stride-1, "same"-padded, odd-sized square kernels, groups 1, float32 without
autocast, output channels a multiple of 8, on CPUs with AVX2 + FMA.

On by default (``ACCELCORE_WGRAD_KERNEL=0`` to disable): its gradients match oneDNN's within
2e-5 per step; over three seeds of ``recipes/yolox_nano_train.yaml`` (20 epochs, Zen 3) it ended
at a mean AP50:95 of 0.395 against 0.430 without it, within that recipe's run-to-run spread
(0.27-0.54), and at 40 epochs, two seeds, 0.667 against 0.674 — no difference beyond the spread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from accelcore.machine import real_cpu_flags
from accelcore.training import native
from accelcore.training.conv_forms import compute_dtype

if TYPE_CHECKING:
    from accelcore.training.conv_forms import Form

KERNEL_SWITCH_ENV = "ACCELCORE_WGRAD_KERNEL"


def kernel() -> Any | None:
    """The weight-gradient kernel (CPUs with AVX2 + FMA; None elsewhere or if it cannot be
    built)."""
    return native.build("conv_weight_grad") if {"avx2", "fma"} <= real_cpu_flags() else None


def _kernel_fits(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    k = conv.kernel_size[0]
    return (conv.groups == 1 and tuple(conv.kernel_size) == (k, k) and k % 2 == 1
            and tuple(conv.stride) == (1, 1) and tuple(conv.padding) == ((k - 1) // 2,) * 2
            and conv.out_channels % 8 == 0 and x.dtype == torch.float32
            and compute_dtype(x) == torch.float32 and conv.weight.dtype == torch.float32
            and native.switched_on(KERNEL_SWITCH_ENV) and kernel() is not None)


def forms(conv: nn.Conv2d, x: torch.Tensor) -> dict[str, Form]:
    """The dense forms of a training convolution that apply (none for other ones); the caller
    checked :func:`~accelcore.training.conv_forms.trains_here`."""
    return {"weight_grad_kernel": with_kernel_weight_grad} if _kernel_fits(conv, x) else {}


class _KernelWeightGrad(torch.autograd.Function):
    """Dense stride-1 "same" convolution: oneDNN's forward and input gradient, the weight
    gradient from ``conv_weight_grad.cpp``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, 1, weight.shape[-1] // 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        pad = weight.shape[-1] // 2
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = kernel().weight_grad(grad, x, weight.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def with_kernel_weight_grad(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` with the weight gradient from the kernel (see :class:`_KernelWeightGrad`)."""
    return _KernelWeightGrad.apply(x, conv.weight, conv.bias)
