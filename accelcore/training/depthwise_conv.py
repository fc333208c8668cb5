"""Depthwise convolutions in training, each computed in the exact form that is fastest here.

Why, profiled on a 2-core Zen 4 (yolox_nano, batch 64, 416 px, bf16 autocast + channels_last):

- oneDNN's backward of the four stride-2 3x3 depthwise convolutions took 770 ms of a 2.4 s step
  (3-7x their float32 time) while its stride-1 backward is fast. A stride-``s`` convolution is
  exactly the stride-1 convolution (same padding) sampled every ``s`` rows and columns, so the
  same output and gradients can come from the stride-1 kernel at ``s``² times the arithmetic
  ("subsampled").
- oneDNN's bfloat16 *weight* gradient of a 3x3 depthwise convolution ran slower than its float32
  one (64 channels at 52 px, batch 64: 9-12 ms against 6-7.5 ms), and its bfloat16 backward of
  the stride-2 ones slower still (16 channels at 208 px: 130 ms against 29 in float32).
  ``depthwise3x3.cpp`` computes the weight gradient (stride 1 or 2) with its nine sums in
  registers, and the stride-2 input gradient as a gather of at most two grad rows per input
  row: 12 ms for that layer in bfloat16 ("kernel": oneDNN's forward and those gradients; at
  stride 1 the input gradient is oneDNN's forward convolution of the output gradient with the
  kernel flipped — the same sums, and on a 2-core Sapphire Rapids in bfloat16 1.7-2x faster than
  oneDNN's backward: 64 channels at 52 px, batch 64, 3.5 against 6.0 ms).
- On a 2-core Zen 3 (AVX2, float32), the same kernels at AVX2 width: yolox_nano's batch-64
  depthwise weight gradients 56 -> 41 ms (sum over its ten shapes, once each), the stride-2
  input gradients 23 -> 19 ms — each shape still takes whichever form it measures fastest.

Which form wins depends on the CPU, the dtype and the shape (the subsampled form lost at 16
channels and 208 px; the weight-gradient kernel only matches oneDNN in float32), so
:func:`accelcore.training.conv_forms.conv2d` times every form that applies, forward +
backward, the first time it sees a shape and remembers the winner for the process.

Only training (grad enabled, module in training mode) on channels_last CPU inputs of a
depthwise ``nn.Conv2d`` is concerned, outside ``torch.compile``; everywhere else, and with
``ACCELCORE_SUBSAMPLED_DW=0`` and ``ACCELCORE_DW_KERNEL=0``, it is exactly ``conv(x)``.
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

SWITCH_ENV = "ACCELCORE_SUBSAMPLED_DW"
KERNEL_SWITCH_ENV = "ACCELCORE_DW_KERNEL"


def enabled() -> bool:
    return native.switched_on(SWITCH_ENV)


def kernel() -> Any | None:
    """The gradient kernels (CPUs with AVX-512, or AVX2 + FMA; None elsewhere or if they cannot
    be built)."""
    flags = real_cpu_flags()
    return native.build("depthwise3x3") if "avx512f" in flags or {"avx2", "fma"} <= flags else None


def _kernel_fits(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return (tuple(conv.kernel_size) == (3, 3) and tuple(conv.padding) == (1, 1)
            and tuple(conv.stride) in ((1, 1), (2, 2)) and conv.in_channels % 16 == 0
            and compute_dtype(x) in (torch.float32, torch.bfloat16)
            and conv.weight.dtype in (torch.float32, torch.bfloat16)
            and native.switched_on(KERNEL_SWITCH_ENV) and kernel() is not None)


def forms(conv: nn.Conv2d, x: torch.Tensor) -> dict[str, Form]:
    """The depthwise forms of a training convolution that apply (none for other ones); the
    caller checked :func:`~accelcore.training.conv_forms.trains_here`."""
    found: dict[str, Form] = {}
    if not (conv.weight.shape[1] == 1 and conv.groups == conv.in_channels == conv.out_channels
            and conv.groups > 1):
        return found
    strided = max(conv.stride) > 1
    if strided and enabled():
        found["subsampled"] = subsampled
    if _kernel_fits(conv, x):
        found["kernel"] = with_kernel_grads
    return found


class _Subsample(torch.autograd.Function):
    """Every ``stride``-th pixel of a channels_last tensor, with a channels_last gradient.

    Plain slicing's backward scatters into a fresh NCHW tensor, which the convolution's backward
    then transposes back to channels_last: that copy alone took 87-195 ms per layer (44-89 MB,
    2-core Zen 4) — more than the convolution it fed.
    """

    @staticmethod
    def forward(ctx, full: torch.Tensor, sh: int, sw: int) -> torch.Tensor:
        ctx.shape, ctx.strides = full.shape, (sh, sw)
        return full[:, :, ::sh, ::sw].contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        sh, sw = ctx.strides
        out = torch.empty(ctx.shape, dtype=grad.dtype, memory_format=torch.channels_last)
        out.zero_()[:, :, ::sh, ::sw] = grad
        return out, None, None


def subsampled(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` computed as the stride-1 convolution sampled every ``stride`` pixels."""
    full = F.conv2d(x, conv.weight, conv.bias, 1, conv.padding, 1, conv.groups)
    return _Subsample.apply(full, *conv.stride)


class _KernelGrad(torch.autograd.Function):
    """3x3 depthwise convolution, stride 1 or 2: oneDNN's forward; the weight gradient, and at
    stride 2 the input gradient, from ``depthwise3x3.cpp`` (at stride 1 the input gradient is
    the flipped kernel's forward convolution). Computes in the autocast dtype where
    autocast is on, as ``F.conv2d`` would."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: int) -> torch.Tensor:
        dtype = compute_dtype(x)
        xc, wc = x.to(dtype), weight.to(dtype)
        with torch.autocast("cpu", enabled=False):
            out = F.conv2d(xc, wc, None if bias is None else bias.to(dtype), stride, 1, 1,
                           weight.shape[0])
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.stride = stride
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xc, wc = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        stride = ctx.stride
        grad = grad.to(xc.dtype).contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if stride == 1:  # the forward convolution of grad with the kernel flipped
                with torch.autocast("cpu", enabled=False):
                    grad_x = F.conv2d(grad, wc.flip((2, 3)), None, 1, 1, 1, wc.shape[0])
            else:
                grad_x = kernel().input_grad_s2(grad, wc, list(xc.shape))
            grad_x = grad_x.to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = kernel().weight_grad(grad, xc, stride).to(w_dtype)
        if b_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3), dtype=torch.float32).to(b_dtype)
        return grad_x, grad_w, grad_b, None


def with_kernel_grads(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` with the gradients from the kernels (see :class:`_KernelGrad`)."""
    return _KernelGrad.apply(x, conv.weight, conv.bias, conv.stride[0])
