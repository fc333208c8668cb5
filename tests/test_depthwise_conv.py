"""Depthwise convolutions in training: the stride-1 + subsampling form and the kernel-gradient
form are the same convolution (output, input and weight gradients), the measured choice
is remembered per shape, and the module is used unchanged wherever no choice applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accelcore.training import conv_forms, depthwise_conv

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
    ya, yb = conv(xa), depthwise_conv.subsampled(twin, xb)
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
    monkeypatch.setattr(conv_forms, "_CHOICES", {})
    measured = []

    def fake_measure(conv, x, candidates):
        measured.append(tuple(x.shape))
        assert set(candidates) == {"onednn", "subsampled"}  # 4 channels: no kernel form
        return "subsampled" if x.shape[-1] == 12 else "onednn"  # "faster" for one size only

    monkeypatch.setattr(conv_forms, "_measure", fake_measure)
    used = []
    real = depthwise_conv.subsampled
    monkeypatch.setattr(depthwise_conv, "subsampled",
                        lambda conv, x: used.append(tuple(x.shape)) or real(conv, x))
    monkeypatch.setenv(depthwise_conv.KERNEL_SWITCH_ENV, "0")
    conv, _ = _pair(4, 2)
    for size in (12, 12, 10, 12, 10):
        x = torch.randn(2, 4, size, size).contiguous(memory_format=CL)
        out = conv_forms.conv2d(conv, x)
        torch.testing.assert_close(out, conv(x))
    assert measured == [(2, 4, 12, 12), (2, 4, 10, 10)]
    assert used == [(2, 4, 12, 12)] * 3
    assert set(conv_forms.choices().values()) == {"subsampled", "onednn"}


def test_real_measurement_returns_a_choice_and_leaves_gradients_and_rng_alone():
    conv, _ = _pair(8, 2)
    x = torch.randn(2, 8, 16, 16).contiguous(memory_format=CL).requires_grad_()
    candidates = conv_forms.forms(conv, x)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    assert conv_forms._measure(conv, x, candidates) in candidates
    assert conv.weight.grad is None and x.grad is None
    # the run's random stream (augmentation, multiscale sizes) is left where it was
    torch.testing.assert_close(torch.rand(4), expected)


def test_not_applied_where_it_does_not_fit(monkeypatch):
    conv, _ = _pair(4, 2)
    x = torch.randn(2, 4, 12, 12).contiguous(memory_format=CL)
    assert conv_forms.applies(conv, x)
    dense = nn.Conv2d(4, 4, 3, 2, 1).to(memory_format=CL)
    assert not conv_forms.applies(dense, x)  # not depthwise
    assert not conv_forms.applies(_pair(4, 1)[0], x)  # stride 1
    assert not conv_forms.applies(conv, x.contiguous())  # NCHW
    class OwnForward(nn.Conv2d):  # e.g. IPEX's prepacked conv: other weight layout
        pass

    own = OwnForward(4, 4, 3, 2, 1, groups=4).to(memory_format=CL)
    assert not conv_forms.applies(own, x)
    with torch.no_grad():
        assert not conv_forms.applies(conv, x)  # no backward to speed up
    assert not conv_forms.applies(conv.eval(), x)
    conv.train()
    monkeypatch.setenv(depthwise_conv.SWITCH_ENV, "0")
    assert not conv_forms.applies(conv, x)  # 4 channels: no kernel form either


def test_yolox_trains_its_depthwise_convs_through_it(monkeypatch):
    from accelcore import registry
    from accelcore.plugins import get_plugin_manager

    get_plugin_manager()
    routed = []
    real = conv_forms.conv2d
    monkeypatch.setattr(conv_forms, "conv2d",
                        lambda conv, x: routed.append((conv, conv_forms.applies(conv, x)))
                        or real(conv, x))
    model = registry.create_model("yolox_nano", num_classes=3).train().to(memory_format=CL)
    images = (torch.rand(2, 3, 64, 64) * 255).contiguous(memory_format=CL)
    model(images, torch.zeros(2, 4, 5))["total_loss"].backward()
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)
                 and m.groups == m.in_channels > 1]
    strided = [m for m in depthwise if m.stride != (1, 1)]
    # four in the backbone's stages, two in the PAFPN's bottom-up downsampling
    assert len(strided) == 6
    chosen = {id(conv) for conv, applies in routed if applies}
    assert all(id(m) in chosen for m in strided)
    if depthwise_conv.kernel() is not None:  # every one has 16k channels: the kernel fits
        assert all(id(m) in chosen for m in depthwise)
    routed.clear()
    with torch.no_grad():
        model.eval()(images)
    assert not any(applies for _, applies in routed)  # eval: the plain conv path


def test_subsampling_hands_the_convolution_a_channels_last_gradient():
    # A NCHW gradient here made the convolution's backward transpose it: the slowest copy of
    # the whole step.
    full = torch.randn(2, 6, 9, 8).contiguous(memory_format=CL).requires_grad_()
    out = depthwise_conv._Subsample.apply(full, 2, 3)
    torch.testing.assert_close(out, full[:, :, ::2, ::3])
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, full, grad)
    (want,) = torch.autograd.grad(full[:, :, ::2, ::3], full, grad)
    assert got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want)


needs_kernel = pytest.mark.skipif(
    depthwise_conv.kernel() is None,
    reason="gradient kernels: CPUs with AVX-512 or AVX2 + FMA, and a compiler")


@needs_kernel
@pytest.mark.parametrize(("dtype", "size", "stride", "bias", "autocast"),
                         [(torch.float32, 13, 1, False, False),
                          (torch.float32, 9, 1, True, False),
                          (torch.float32, 17, 2, False, False),
                          (torch.float32, 14, 2, True, False),
                          (torch.bfloat16, 12, 1, False, False),
                          (torch.bfloat16, 20, 2, False, False),
                          (torch.bfloat16, 15, 2, True, False),
                          (torch.float32, 11, 1, True, True),
                          (torch.float32, 16, 2, False, True)])
def test_kernel_gradient_form_is_the_same_convolution(dtype, size, stride, bias, autocast):
    torch.manual_seed(size)
    conv = nn.Conv2d(32, 32, 3, stride, 1, groups=32, bias=bias).to(dtype)
    twin = nn.Conv2d(32, 32, 3, stride, 1, groups=32, bias=bias).to(dtype)
    twin.load_state_dict(conv.state_dict())
    x = torch.randn(3, 32, size, size + 3, dtype=dtype).contiguous(memory_format=CL)
    assert "kernel" in conv_forms.forms(conv, x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ya, yb = conv(xa), depthwise_conv.with_kernel_grads(twin, xb)
    assert ya.dtype == yb.dtype and ya.shape == yb.shape
    grad = torch.randn_like(ya)
    ya.backward(grad)
    yb.backward(grad)
    low = dtype == torch.bfloat16 or autocast
    tol = {"rtol": 2e-2, "atol": 2e-2} if low else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(yb, ya, **tol)
    torch.testing.assert_close(xb.grad, xa.grad, **tol)
    assert twin.weight.grad.dtype == conv.weight.grad.dtype == dtype
    assert xb.grad.is_contiguous(memory_format=CL)
    # the reference weight gradient in float64 (oneDNN's own bfloat16 one is the less exact)
    xr = x.double().requires_grad_()
    ref = nn.Conv2d(32, 32, 3, stride, 1, groups=32, bias=bias).double()
    ref.load_state_dict(conv.state_dict())
    cast = (lambda t: t.bfloat16().double()) if low else (lambda t: t)
    with torch.no_grad():
        ref.weight.copy_(cast(ref.weight))
    torch.nn.functional.conv2d(cast(xr), ref.weight, ref.bias, stride, 1, 1, 32).backward(
        cast(grad.double()))
    scale = ref.weight.grad.abs().max()
    assert (twin.weight.grad.double() - ref.weight.grad).abs().max() / scale < (
        1e-2 if low else 1e-5)
    if bias:
        torch.testing.assert_close(twin.bias.grad.double(), ref.bias.grad, rtol=1e-2 if low
                                   else 1e-5, atol=1e-3 if low else 1e-5)


@needs_kernel
def test_kernel_form_offered_only_where_it_fits(monkeypatch):
    x16 = torch.randn(2, 16, 8, 8).contiguous(memory_format=CL)
    conv = nn.Conv2d(16, 16, 3, 1, 1, groups=16).to(memory_format=CL).train()
    assert set(conv_forms.forms(conv, x16)) == {"onednn", "kernel"}
    five = nn.Conv2d(16, 16, 5, 1, 2, groups=16).to(memory_format=CL)
    assert set(conv_forms.forms(five, x16)) == {"onednn"}  # 3x3 only
    x8 = torch.randn(2, 8, 8, 8).contiguous(memory_format=CL)
    eight = nn.Conv2d(8, 8, 3, 1, 1, groups=8).to(memory_format=CL)
    assert set(conv_forms.forms(eight, x8)) == {"onednn"}  # 16k channels only
    strided = nn.Conv2d(16, 16, 3, 2, 1, groups=16).to(memory_format=CL).train()
    assert set(conv_forms.forms(strided, x16)) == {"onednn", "subsampled", "kernel"}
    stride3 = nn.Conv2d(16, 16, 3, 3, 1, groups=16).to(memory_format=CL).train()
    assert set(conv_forms.forms(stride3, x16)) == {"onednn", "subsampled"}  # 1 or 2 only
    monkeypatch.setenv(depthwise_conv.KERNEL_SWITCH_ENV, "0")
    assert set(conv_forms.forms(conv, x16)) == {"onednn"}
