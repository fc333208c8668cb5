"""1x1 convolutions in bfloat16 training: the form with the AMX kernel's backward is the same
convolution (input gradient as oneDNN's, weight gradient against float64 and closer to it than
oneDNN's bfloat16 one), is offered only where the kernel fits, and YOLOX's bf16 1x1
convolutions go through the measured choice with it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accelcore.training import conv_forms, pointwise_conv

CL = torch.channels_last

needs_kernel = pytest.mark.skipif(
    pointwise_conv.kernel() is None,
    reason="1x1 backward kernel: CPUs with AMX-BF16 (Sapphire Rapids and later) and a compiler")


@pytest.fixture(autouse=True)
def _switches_default(monkeypatch):
    monkeypatch.delenv(pointwise_conv.SWITCH_ENV, raising=False)
    monkeypatch.delenv("ACCELCORE_LEAN_STEP", raising=False)


def _reference(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor):
    """Float64 output and gradients of the convolution on the same bf16-rounded operands."""
    w = conv.weight.detach().to(torch.bfloat16).double().requires_grad_()
    xr = x.detach().to(torch.bfloat16).double().requires_grad_()
    y = torch.nn.functional.conv2d(xr, w)
    y.backward(grad.double())
    return y, xr.grad, w.grad


@needs_kernel
@pytest.mark.parametrize(("ins", "outs", "batch", "height", "width"), [
    (64, 64, 2, 13, 13),  # 338 pixels: a partial chunk and a partial 32-row block
    (32, 16, 3, 7, 5),  # 16 outputs: the input gradient's K is 16
    (16, 96, 1, 5, 5),  # an odd number of 32-channel output blocks, 16 inputs
    (48, 32, 5, 16, 16),  # 1280 pixels: several whole chunks; 48 inputs: a 16-channel block
])
def test_kernel_form_is_the_same_convolution(ins, outs, batch, height, width):
    torch.manual_seed(ins + outs + height)
    conv = nn.Conv2d(ins, outs, 1, bias=False).to(memory_format=CL).train()
    x = torch.randn(batch, ins, height, width).contiguous(memory_format=CL)
    assert "amx_backward" in _forms_under_autocast(conv, x)
    xb = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pointwise_conv.with_kernel_backward(conv, xb)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)
    grad = torch.randn_like(y)
    y.backward(grad)

    y_ref, gx_ref, gw_ref = _reference(conv, x, grad)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-2, atol=1e-2)
    # The input gradient is a bf16 result (8 significant bits), as oneDNN's.
    assert ((xb.grad.double() - gx_ref).abs().max() / gx_ref.abs().max()) < 1e-2
    assert xb.grad.dtype == x.dtype and xb.grad.is_contiguous(memory_format=CL)
    # The weight gradient is accumulated and returned in float32: far closer than bf16.
    assert conv.weight.grad.dtype == torch.float32
    assert ((conv.weight.grad.double() - gw_ref).abs().max() / gw_ref.abs().max()) < 1e-5


def _forms_under_autocast(conv: nn.Conv2d, x: torch.Tensor) -> dict:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return conv_forms.forms(conv, x)


@needs_kernel
def test_kernel_form_offered_only_where_it_fits(monkeypatch):
    x = torch.randn(2, 32, 8, 8).contiguous(memory_format=CL)

    def offered(conv: nn.Conv2d, inp: torch.Tensor = x) -> bool:
        return "amx_backward" in _forms_under_autocast(conv.to(memory_format=CL).train(), inp)

    assert offered(nn.Conv2d(32, 64, 1, bias=False))
    assert offered(nn.Conv2d(32, 16, 1, bias=False))
    assert not offered(nn.Conv2d(32, 48, 1, bias=False))  # outputs neither 16 nor 32k
    assert not offered(nn.Conv2d(32, 64, 1, bias=True))  # a bias
    assert not offered(nn.Conv2d(32, 64, 3, 1, 1, bias=False))  # 3x3
    assert not offered(nn.Conv2d(32, 64, 1, 2, bias=False))  # stride 2
    assert not offered(nn.Conv2d(32, 64, 1, groups=2, bias=False))  # grouped
    assert not offered(nn.Conv2d(24, 64, 1, bias=False), torch.randn(2, 24, 8, 8).contiguous(
        memory_format=CL))  # inputs not a multiple of 16
    assert not offered(nn.Conv2d(32, 64, 1, bias=False), x.contiguous())  # NCHW
    conv = nn.Conv2d(32, 64, 1, bias=False).to(memory_format=CL).train()
    assert "amx_backward" not in conv_forms.forms(conv, x)  # float32: no autocast
    monkeypatch.setenv(pointwise_conv.SWITCH_ENV, "0")
    assert not offered(nn.Conv2d(32, 64, 1, bias=False))  # switched off
    monkeypatch.delenv(pointwise_conv.SWITCH_ENV)
    monkeypatch.setenv("ACCELCORE_LEAN_STEP", "0")  # the whole lean step off
    assert not offered(nn.Conv2d(32, 64, 1, bias=False))


@needs_kernel
def test_yolox_pointwise_convs_are_offered_the_kernel_in_bf16(yolox_conv_offers):
    _, offered = yolox_conv_offers("amx_backward", torch.bfloat16)
    pointwise = [conv for conv, _ in offered if conv.kernel_size == (1, 1)]
    assert pointwise and all(yes for conv, yes in offered if conv.kernel_size == (1, 1))
    assert all(m.weight.grad is not None and torch.isfinite(m.weight.grad).all()
               for m in pointwise)
