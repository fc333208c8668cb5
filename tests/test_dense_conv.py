"""Dense convolutions in training: the form with the kernel's weight gradient is the same
convolution (output, input, weight and bias gradients, against float64), is offered only where
the kernel fits, and YOLOX's stem and 1x1 convolutions go through the measured choice."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accelcore.training import conv_forms, dense_conv

CL = torch.channels_last


@pytest.fixture(autouse=True)
def _switches_default(monkeypatch):
    monkeypatch.delenv(dense_conv.KERNEL_SWITCH_ENV, raising=False)
    monkeypatch.delenv("ACCELCORE_LEAN_STEP", raising=False)


needs_kernel = pytest.mark.skipif(dense_conv.kernel() is None,
                                  reason="weight-gradient kernel: AVX2 + FMA CPUs with a compiler")


@needs_kernel
@pytest.mark.parametrize(("ins", "outs", "k", "height", "width", "bias", "input_grad"), [
    (12, 16, 3, 13, 11, False, False),  # the stem's shape, small
    (5, 24, 3, 1, 7, True, True),  # one row: only the middle tap row is inside
    (7, 8, 3, 6, 1, False, True),  # one column: only edge pixels
    (6, 8, 5, 4, 3, True, True),  # narrower than the kernel
    (64, 40, 1, 9, 7, False, True),  # 1x1, rows not a multiple of the kernel's block
    (33, 136, 1, 17, 19, True, True),  # 1x1 with >= 128 outputs (packed tiles) and a tail of 8
])
def test_kernel_form_is_the_same_convolution(ins, outs, k, height, width, bias, input_grad):
    torch.manual_seed(ins * outs + k)
    conv = nn.Conv2d(ins, outs, k, 1, k // 2, bias=bias).to(memory_format=CL).train()
    x = torch.randn(3, ins, height, width).contiguous(memory_format=CL)
    assert "weight_grad_kernel" in conv_forms.forms(conv, x)
    xb = x.clone().requires_grad_(input_grad)
    y = dense_conv.with_kernel_weight_grad(conv, xb)
    grad = torch.randn_like(y)
    y.backward(grad)

    ref = nn.Conv2d(ins, outs, k, 1, k // 2, bias=bias).double()
    ref.load_state_dict(conv.state_dict())
    xr = x.double().requires_grad_(input_grad)
    yr = ref(xr)
    yr.backward(grad.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    scale = ref.weight.grad.abs().max()
    assert (conv.weight.grad.double() - ref.weight.grad).abs().max() / scale < 1e-5
    assert conv.weight.grad.shape == conv.weight.shape
    if bias:
        torch.testing.assert_close(conv.bias.grad.double(), ref.bias.grad, rtol=1e-5, atol=1e-5)
    if input_grad:
        torch.testing.assert_close(xb.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
        assert xb.grad.is_contiguous(memory_format=CL)
    else:
        assert xb.grad is None


@needs_kernel
def test_kernel_form_offered_only_where_it_fits(monkeypatch):
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=CL)

    def offered(conv: nn.Conv2d, inp: torch.Tensor = x) -> bool:
        return "weight_grad_kernel" in conv_forms.forms(conv.to(memory_format=CL).train(), inp)

    assert offered(nn.Conv2d(16, 32, 1))
    assert offered(nn.Conv2d(16, 8, 3, 1, 1))
    assert not offered(nn.Conv2d(16, 32, 3, 2, 1))  # stride 2
    assert not offered(nn.Conv2d(16, 32, 3, 1, 0))  # not "same" padding
    assert not offered(nn.Conv2d(16, 32, 2, 1, 1))  # even kernel
    assert not offered(nn.Conv2d(16, 20, 1))  # outputs not a multiple of 8
    assert not offered(nn.Conv2d(16, 16, 3, 1, 1, groups=2))  # grouped
    assert not offered(nn.Conv2d(16, 32, 1), x.contiguous())  # NCHW
    assert not offered(nn.Conv2d(16, 32, 1).double(), x.double())  # float32 only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not offered(nn.Conv2d(16, 32, 1))  # computes in bfloat16
    with torch.no_grad():
        assert not offered(nn.Conv2d(16, 32, 1))  # no backward
    assert not conv_forms.applies(nn.Conv2d(16, 32, 1).to(memory_format=CL).eval(), x)
    assert offered(nn.Conv2d(16, 32, 1))  # on by default
    monkeypatch.setenv(dense_conv.KERNEL_SWITCH_ENV, "0")
    assert not offered(nn.Conv2d(16, 32, 1))  # switched off
    monkeypatch.delenv(dense_conv.KERNEL_SWITCH_ENV)
    monkeypatch.setenv("ACCELCORE_LEAN_STEP", "0")  # the whole lean step off
    assert not offered(nn.Conv2d(16, 32, 1))


@needs_kernel
def test_yolox_stem_and_pointwise_convs_are_offered_the_kernel(yolox_conv_offers):
    model, offered = yolox_conv_offers("weight_grad_kernel")
    with_kernel = {id(conv) for conv, yes in offered if yes}
    stem = model.backbone.backbone.stem.conv.conv
    assert id(stem) in with_kernel
    pointwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                 and id(m) in {id(conv) for conv, _ in offered}]
    assert pointwise and all(id(m) in with_kernel for m in pointwise)
