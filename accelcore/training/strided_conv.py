"""Strided depthwise convolutions, trained in whichever exact form is faster on this CPU.

Why: profiled on a 2-core Zen 4 (yolox_nano, batch 64, 416 px, bf16 autocast + channels_last),
oneDNN's backward of the four stride-2 3x3 depthwise convolutions took 770 ms of a 2.4 s step —
3-7x their float32 time — while its stride-1 depthwise backward is fast. A stride-``s``
convolution is exactly the stride-1 convolution (same padding) sampled every ``s`` rows and
columns, so the same output and gradients can come from the stride-1 kernel at ``s``² times the
arithmetic. Which form wins depends on the CPU, the dtype and the shape (measured there: 64 and
128 channels at 52 and 26 px, 86 -> 42 ms and 55 -> 10 ms; 16 channels at 208 px lost,
172 -> 229 ms), so :func:`conv2d` times both forms, forward + backward, the first time it sees
a shape and remembers the winner for the process.

It applies only in training (grad enabled, module in training mode) to channels_last CPU
inputs of a depthwise ``nn.Conv2d`` with stride > 1, outside ``torch.compile``; everywhere
else, and with ``ACCELCORE_SUBSAMPLED_DW=0``, it is exactly ``conv(x)``.
"""

from __future__ import annotations

import logging
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SWITCH_ENV = "ACCELCORE_SUBSAMPLED_DW"
#: Timed forward + backward passes per form (after one untimed warm-up each), interleaved.
TRIALS = 3

#: shape key -> True when the stride-1 + subsampling form was faster
_CHOICES: dict[tuple, bool] = {}


def enabled() -> bool:
    return os.environ.get(SWITCH_ENV, "1") != "0"


def applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether :func:`conv2d` may choose the subsampled form for this module and input."""
    stride = tuple(conv.stride)
    # Only torch's own module: subclasses (IPEX's prepacked convs, quantised ones) keep their
    # weights in other layouts and compute through their own forward.
    return (type(conv) is nn.Conv2d and conv.weight.dim() == 4 and conv.weight.shape[1] == 1
            and conv.training and torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dim() == 4 and conv.groups == conv.in_channels == conv.out_channels
            and conv.groups > 1 and max(stride) > 1 and tuple(conv.dilation) == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling() and not torch.jit.is_scripting()
            and enabled())


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


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, through the faster exact form where :func:`applies` (see the module doc)."""
    if not applies(conv, x):
        return conv(x)
    key = _key(conv, x)
    faster = _CHOICES.get(key)
    if faster is None:
        faster = _CHOICES[key] = _measure(conv, x)
    return subsampled(conv, x) if faster else conv(x)


def choices() -> dict[str, str]:
    """What was chosen so far, for logs and reports: shape -> ``"subsampled"`` or ``"strided"``."""
    return {" ".join(str(v) for v in key): "subsampled" if faster else "strided"
            for key, faster in _CHOICES.items()}


def _key(conv: nn.Conv2d, x: torch.Tensor) -> tuple:
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    return (tuple(x.shape), str(x.dtype), str(autocast), tuple(conv.kernel_size),
            tuple(conv.stride), tuple(conv.padding), conv.bias is not None,
            torch.get_num_threads())


def _measure(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Time both forms, forward + backward, on detached copies (no effect on the real graph
    or gradients); True when the subsampled one has the lower median."""
    probe = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, groups=conv.groups, bias=conv.bias is not None)
    probe = probe.to(conv.weight.dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        probe.weight.copy_(conv.weight)
    inp = x.detach().clone(memory_format=torch.channels_last).requires_grad_(True)
    params = [inp, *probe.parameters()]

    def run(form) -> float:
        start = time.perf_counter()
        out = form(probe, inp)
        torch.autograd.grad(out, params, torch.ones_like(out))
        return time.perf_counter() - start

    forms = {"strided": lambda m, t: m(t), "subsampled": subsampled}
    times: dict[str, list[float]] = {name: [] for name in forms}
    for form in forms.values():
        run(form)  # warm-up: oneDNN builds its kernels for the shape
    for _ in range(TRIALS):
        for name, form in forms.items():
            times[name].append(run(form))
    strided, sub = (statistics.median(times[n]) for n in forms)
    log.info("strided depthwise conv %s: strided %.1f ms, stride-1 + subsampling %.1f ms",
             " ".join(str(v) for v in _key(conv, x)), 1e3 * strided, 1e3 * sub)
    return sub < strided
