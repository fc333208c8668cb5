"""Training convolutions, each computed in the exact form measured fastest for its shape here.

A form is another way to compute the same ``conv(x)`` — output, input and weight gradients —
with a different split of work between oneDNN and the project's kernels:
:mod:`~accelcore.training.depthwise_conv` has the depthwise ones,
:mod:`~accelcore.training.dense_conv` the dense ones, :mod:`~accelcore.training.pointwise_conv`
the 1x1 ones in bfloat16 on AMX. Which wins depends on the CPU, the dtype
and the shape, so :func:`conv2d` times every form that applies, forward + backward, the first
time it sees a shape, and remembers the winner for the process. Where no form but the module's
own applies (eval, NCHW, under ``torch.compile``, switched off), it is exactly ``conv(x)``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Timed forward + backward passes per form (after one untimed warm-up each), interleaved.
TRIALS = 3

Form = Callable[[nn.Conv2d, torch.Tensor], torch.Tensor]

#: (shape key, names of the forms that applied) -> name of the fastest form
_CHOICES: dict[tuple[tuple, tuple[str, ...]], str] = {}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.conv2d(x, ...)`` computes in: autocast's where it is on."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def trains_here(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv(x)`` is a training step's CPU channels_last convolution of torch's own
    module, the only case any form other than the module's own is for."""
    # Only torch's own module: subclasses (IPEX's prepacked convs, quantised ones) keep their
    # weights in other layouts and compute through their own forward.
    return (type(conv) is nn.Conv2d and conv.weight.dim() == 4 and conv.training
            and torch.is_grad_enabled() and x.device.type == "cpu" and x.dim() == 4
            and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling() and not torch.jit.is_scripting())


def forms(conv: nn.Conv2d, x: torch.Tensor) -> dict[str, Form]:
    """The exact forms of ``conv(x)`` to choose from; just ``{"onednn": ...}`` where nothing
    else applies."""
    from accelcore.training import (  # they build on this module
        dense_conv,
        depthwise_conv,
        pointwise_conv,
    )

    found: dict[str, Form] = {"onednn": _module_form}
    if trains_here(conv, x):
        found |= depthwise_conv.forms(conv, x)
        found |= dense_conv.forms(conv, x)
        found |= pointwise_conv.forms(conv, x)
    return found


def _module_form(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv(x)


def applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether :func:`conv2d` has a form other than the module's own to choose from."""
    return len(forms(conv, x)) > 1


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
    return (tuple(x.shape), str(x.dtype), str(compute_dtype(x)),
            conv.in_channels, conv.out_channels, conv.groups, tuple(conv.kernel_size),
            tuple(conv.stride), tuple(conv.padding), conv.bias is not None, x.requires_grad,
            torch.get_num_threads())


def _measure(conv: nn.Conv2d, x: torch.Tensor, candidates: dict[str, Form]) -> str:
    """Time every form, forward + backward, on detached copies (no effect on the real graph
    or gradients); the name of the one with the lowest median."""
    # Without touching the global RNG (an initialised probe would draw from it): a
    # measurement must not change the run's random stream (augmentation, multiscale sizes).
    probe = nn.utils.skip_init(nn.Conv2d, conv.in_channels, conv.out_channels,
                               conv.kernel_size, conv.stride, conv.padding, groups=conv.groups,
                               bias=conv.bias is not None)
    probe = probe.to(conv.weight.dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        probe.weight.copy_(conv.weight)
        if conv.bias is not None:
            probe.bias.copy_(conv.bias)
    # The input needs a gradient only where the real one does (a stem's images do not).
    inp = x.detach().clone(memory_format=torch.channels_last).requires_grad_(x.requires_grad)
    params = [inp, *probe.parameters()] if x.requires_grad else list(probe.parameters())

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
    log.info("conv %s: %s", " ".join(str(v) for v in _key(conv, x)),
             ", ".join(f"{name} {1e3 * t:.1f} ms" for name, t in medians.items()))
    return min(medians, key=medians.get)
