"""Fused training-mode BatchNorm2d + SiLU for channels_last CPU tensors (``bn_silu.cpp``).

Why: profiled on a 2-core Zen 4 (yolox_nano, batch 64, 416 px, bf16 autocast + channels_last),
BatchNorm and SiLU forward and backward took 43% of a training step — as much as every
convolution together — although they are a few memory passes each; inductor's generated
kernels for them were slower than eager. The fused kernel reads and writes each activation
fewer times (2 passes forward, 2 backward, no saved pre-activation) and computes in float32
whatever the storage type.

The kernel is compiled for this CPU on first use (:mod:`accelcore.training.native`). Where it
cannot be built or does not apply (eval mode, NCHW, float64, under ``torch.compile``,
``ACCELCORE_FUSED_BN_SILU=0``) :func:`bn_silu` is exactly ``silu(bn(x))``.
Semantics match ``nn.BatchNorm2d`` in training: batch statistics (biased variance) normalise,
the running statistics get the unbiased variance with the module's momentum.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from accelcore.training import native

SWITCH_ENV = "ACCELCORE_FUSED_BN_SILU"
_DTYPES = (torch.float32, torch.bfloat16)


def extension() -> Any | None:
    """The compiled kernel module, built on first call (None if it cannot be built here)."""
    return native.build("bn_silu")


def enabled() -> bool:
    return native.switched_on(SWITCH_ENV)


def fusable(x: torch.Tensor, bn: nn.BatchNorm2d) -> bool:
    """Whether :func:`bn_silu` takes the fused kernel for this input and module."""
    return (bn.training and bn.affine and bn.track_running_stats and bn.momentum is not None
            and x.device.type == "cpu" and x.dim() == 4 and x.dtype in _DTYPES
            and bn.weight.dtype == bn.running_mean.dtype == bn.running_var.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling() and not torch.jit.is_scripting()
            and enabled() and extension() is not None)


class _FusedBnSilu(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                bn: nn.BatchNorm2d) -> torch.Tensor:
        # The kernel also updates bn's running statistics (in place, not part of the graph).
        y, mean, invstd = extension().forward(x, weight, bias, float(bn.eps), bn.running_mean,
                                              bn.running_var, float(bn.momentum))
        ctx.save_for_backward(x, mean, invstd, weight, bias)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[Any, ...]:
        x, mean, invstd, weight, bias = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = extension().backward(grad_y, x, mean, invstd, weight,
                                                              bias)
        return grad_x, grad_weight, grad_bias, None


def reads_channel_slices(y: torch.Tensor) -> bool:
    """Whether ``y`` came from the fused kernel, whose backward reads a gradient that is a
    channel slice of a wider channels_last tensor in place (so a concatenation need not copy
    its slice of the gradient out first)."""
    return isinstance(y.grad_fn, _FusedBnSilu._backward_cls)


def bn_silu(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``silu(bn(x))``, fused on CPU channels_last training inputs (see module docs)."""
    if not fusable(x, bn):
        return F.silu(bn(x))
    bn.num_batches_tracked.add_(1)
    return _FusedBnSilu.apply(x, bn.weight, bn.bias, bn)
