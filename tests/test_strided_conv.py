"""Strided depthwise convolutions: the stride-1 + subsampling form is the same convolution
(output, input and weight gradients), the measured choice is remembered per shape, and the
module is used unchanged wherever the choice does not apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accelcore.training import strided_conv

CL = torch.channels_last


def _pair(channels: int, stride: int, bias: bool = False) -> tuple[nn.Conv2d, nn.Conv2d]:
    torch.manual_seed(channels + stride)
    conv = nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=bias)
    twin = nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=bias)
    twin.load_state_dict(conv.state_dict())
    return conv.to(memory_format=CL).train(), twin.to(memory_format=CL).train()


@pytest.mark.parametrize(("dtype", "size", "stride", "bias"),
                         [(torch.float32, 17, 2, False), (torch.float32, 16, 2, True),
                          (torch.bfloat16, 20, 2, False), (torch.float32, 15, 3, False)])
def test_subsampled_form_is_the_same_convolution(dtype, size, stride, bias):
    conv, twin = _pair(8, stride, bias)
    conv, twin = conv.to(dtype), twin.to(dtype)
    x = torch.randn(3, 8, size, size, dtype=dtype).contiguous(memory_format=CL)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = conv(xa), strided_conv.subsampled(twin, xb)
    assert ya.shape == yb.shape and yb.is_contiguous(memory_format=CL)
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2,
                                                                        "atol": 2e-2}
    torch.testing.assert_close(yb, ya, **tol)
    torch.testing.assert_close(xb.grad, xa.grad, **tol)
    torch.testing.assert_close(twin.weight.grad, conv.weight.grad, **tol)
    if bias:
        torch.testing.assert_close(twin.bias.grad, conv.bias.grad, **tol)


def test_choice_is_measured_once_per_shape_and_used(monkeypatch):
    monkeypatch.setattr(strided_conv, "_CHOICES", {})
    measured = []

    def fake_measure(conv, x):
        measured.append(tuple(x.shape))
        return x.shape[-1] == 12  # "faster" for one size only

    monkeypatch.setattr(strided_conv, "_measure", fake_measure)
    used = []
    real = strided_conv.subsampled
    monkeypatch.setattr(strided_conv, "subsampled",
                        lambda conv, x: used.append(tuple(x.shape)) or real(conv, x))
    conv, _ = _pair(4, 2)
    for size in (12, 12, 10, 12, 10):
        x = torch.randn(2, 4, size, size).contiguous(memory_format=CL)
        out = strided_conv.conv2d(conv, x)
        torch.testing.assert_close(out, conv(x))
    assert measured == [(2, 4, 12, 12), (2, 4, 10, 10)]
    assert used == [(2, 4, 12, 12)] * 3
    assert set(strided_conv.choices().values()) == {"subsampled", "strided"}


def test_real_measurement_returns_a_choice_and_leaves_gradients_alone():
    conv, _ = _pair(8, 2)
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=CL).requires_grad_()
    assert strided_conv._measure(conv, x) in (True, False)
    assert conv.weight.grad is None and x.grad is None


def test_not_applied_where_it_does_not_fit(monkeypatch):
    conv, _ = _pair(4, 2)
    x = torch.randn(2, 4, 12, 12).contiguous(memory_format=CL)
    assert strided_conv.applies(conv, x)
    dense = nn.Conv2d(4, 4, 3, 2, 1).to(memory_format=CL)
    assert not strided_conv.applies(dense, x)  # not depthwise
    assert not strided_conv.applies(_pair(4, 1)[0], x)  # stride 1
    assert not strided_conv.applies(conv, x.contiguous())  # NCHW
    class OwnForward(nn.Conv2d):  # e.g. IPEX's prepacked conv: other weight layout
        pass

    own = OwnForward(4, 4, 3, 2, 1, groups=4).to(memory_format=CL)
    assert not strided_conv.applies(own, x)
    with torch.no_grad():
        assert not strided_conv.applies(conv, x)  # no backward to speed up
    assert not strided_conv.applies(conv.eval(), x)
    conv.train()
    monkeypatch.setenv(strided_conv.SWITCH_ENV, "0")
    assert not strided_conv.applies(conv, x)


def test_yolox_trains_its_strided_depthwise_convs_through_it(monkeypatch):
    from accelcore import registry
    from accelcore.plugins import get_plugin_manager

    get_plugin_manager()
    seen = []
    real = strided_conv.conv2d
    monkeypatch.setattr(strided_conv, "conv2d",
                        lambda conv, x: seen.append(strided_conv.applies(conv, x))
                        or real(conv, x))
    model = registry.create_model("yolox_nano", num_classes=3).train().to(memory_format=CL)
    images = (torch.rand(2, 3, 64, 64) * 255).contiguous(memory_format=CL)
    model(images, torch.zeros(2, 4, 5))["total_loss"].backward()
    strided_depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)
                         and m.stride != (1, 1) and m.groups == m.in_channels > 1]
    # four in the backbone's stages, two in the PAFPN's bottom-up downsampling
    assert len(strided_depthwise) == 6
    assert sum(seen) == len(strided_depthwise)
    seen.clear()
    with torch.no_grad():
        model.eval()(images)
    assert not seen  # eval: the plain conv path


def test_subsampling_hands_the_convolution_a_channels_last_gradient():
    # A NCHW gradient here made the convolution's backward transpose it: the slowest copy of
    # the whole step.
    full = torch.randn(2, 6, 9, 8).contiguous(memory_format=CL).requires_grad_()
    out = strided_conv._Subsample.apply(full, 2, 3)
    torch.testing.assert_close(out, full[:, :, ::2, ::3])
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, full, grad)
    (want,) = torch.autograd.grad(full[:, :, ::2, ::3], full, grad)
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want)
