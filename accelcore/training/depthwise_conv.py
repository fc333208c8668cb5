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
  row: 12 ms for that layer in bfloat16 ("kernel": oneDNN's forward, those gradients; oneDNN's
  input gradient at stride 1, where it is fast).

Which form wins depends on the CPU, the dtype and the shape (the subsampled form lost at 16
channels and 208 px; the weight-gradient kernel only matches oneDNN in float32), so
:func:`conv2d` times every form that applies, forward + backward, the first time it sees a
shape and remembers the winner for the process.

Only training (grad enabled, module in training mode) on channels_last CPU inputs of a
depthwise ``nn.Conv2d`` is concerned, outside ``torch.compile``; everywhere else, and with
``ACCELCORE_SUBSAMPLED_DW=0`` and ``ACCELCORE_DW_KERNEL=0``, it is exactly ``conv(x)``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from accelcore.machine import real_cpu_flags
from accelcore.training import native

log = logging.getLogger(__name__)

SWITCH_ENV = "ACCELCORE_SUBSAMPLED_DW"
KERNEL_SWITCH_ENV = "ACCELCORE_DW_KERNEL"
#: Timed forward + backward passes per form (after one untimed warm-up each), interleaved.
TRIALS = 3

Form = Callable[[nn.Conv2d, torch.Tensor], torch.Tensor]

#: (shape key, names of the forms that applied) -> name of the fastest form
_CHOICES: dict[tuple[tuple, tuple[str, ...]], str] = {}


def enabled() -> bool:
    return native.switched_on(SWITCH_ENV)


def kernel() -> Any | None:
    """The gradient kernels (AVX-512 CPUs only; None elsewhere or if they cannot be built)."""
    return native.build("depthwise3x3") if "avx512f" in real_cpu_flags() else None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _depthwise_training(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    # Only torch's own module: subclasses (IPEX's prepacked convs, quantised ones) keep their
    # weights in other layouts and compute through their own forward.
    return (type(conv) is nn.Conv2d and conv.weight.dim() == 4 and conv.weight.shape[1] == 1
            and conv.training and torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dim() == 4 and conv.groups == conv.in_channels == conv.out_channels
            and conv.groups > 1 and tuple(conv.dilation) == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling() and not torch.jit.is_scripting())


def _kernel_fits(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return (tuple(conv.kernel_size) == (3, 3) and tuple(conv.padding) == (1, 1)
            and tuple(conv.stride) in ((1, 1), (2, 2)) and conv.in_channels % 16 == 0
            and _compute_dtype(x) in (torch.float32, torch.bfloat16)
            and conv.weight.dtype in (torch.float32, torch.bfloat16)
            and native.switched_on(KERNEL_SWITCH_ENV) and kernel() is not None)


def forms(conv: nn.Conv2d, x: torch.Tensor) -> dict[str, Form]:
    """The exact forms of ``conv(x)`` to choose from; just ``{"onednn": ...}`` where nothing
    else applies."""
    found: dict[str, Form] = {"onednn": _module_form}
    if not _depthwise_training(conv, x):
        return found
    strided = max(conv.stride) > 1
    if strided and enabled():
        found["subsampled"] = subsampled
    if _kernel_fits(conv, x):
        found["kernel"] = with_kernel_grads
    return found


def _module_form(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv(x)


def applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether :func:`conv2d` has a form other than the module's own to choose from."""
    return len(forms(conv, x)) > 1


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
    stride 2 the input gradient, from ``depthwise3x3.cpp``. Computes in the autocast dtype where
    autocast is on, as ``F.conv2d`` would."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: int) -> torch.Tensor:
        dtype = _compute_dtype(x)
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
            if stride == 1:
                grad_x = torch.ops.aten.convolution_backward(
                    grad, xc, wc, None, [1, 1], [1, 1], [1, 1], False, [0, 0], wc.shape[0],
                    [True, False, False])[0]
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


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, in the form measured fastest for its shape (see the module doc)."""
    candidates = forms(conv, x)
    if len(candidates) == 1:
        return conv(x)
    key = (_key(conv, x), tuple(candidates))  # a switch flipped mid-process: measured anew
    name = _CHOICES.get(key)
    if name is None:
        name = _CHOICES[key] = _measure(conv, x, candidates)
    return candidates[name](conv, x)


def choices() -> dict[str, str]:
    """What was chosen so far, for logs and reports: shape -> form name."""
    return {" ".join(str(v) for v in shape): name for (shape, _), name in _CHOICES.items()}


def _key(conv: nn.Conv2d, x: torch.Tensor) -> tuple:
    return (tuple(x.shape), str(x.dtype), str(_compute_dtype(x)), tuple(conv.kernel_size),
            tuple(conv.stride), tuple(conv.padding), conv.bias is not None,
            torch.get_num_threads())


def _measure(conv: nn.Conv2d, x: torch.Tensor, candidates: dict[str, Form]) -> str:
    """Time every form, forward + backward, on detached copies (no effect on the real graph
    or gradients); the name of the one with the lowest median."""
    probe = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, groups=conv.groups, bias=conv.bias is not None)
    probe = probe.to(conv.weight.dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        probe.weight.copy_(conv.weight)
    inp = x.detach().clone(memory_format=torch.channels_last).requires_grad_(True)
    params = [inp, *probe.parameters()]

    def run(form: Form) -> float:
        start = time.perf_counter()
        out = form(probe, inp)
        torch.autograd.grad(out, params, torch.ones_like(out))
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in candidates}
    for form in candidates.values():
        run(form)  # warm-up: oneDNN builds its kernels for the shape
    for _ in range(TRIALS):
        for name, form in candidates.items():
            times[name].append(run(form))
    medians = {name: statistics.median(t) for name, t in times.items()}
    log.info("depthwise conv %s: %s", " ".join(str(v) for v in _key(conv, x)),
             ", ".join(f"{name} {1e3 * t:.1f} ms" for name, t in medians.items()))
    return min(medians, key=medians.get)
