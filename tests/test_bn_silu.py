"""The fused training BatchNorm2d + SiLU kernel computes what silu(bn(x)) computes: output,
input/weight/bias gradients and running statistics; everything it does not cover is the eager
path, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accelcore.training import bn_silu as fused

pytestmark = pytest.mark.skipif(fused.extension() is None,
                                reason="the kernel cannot be built here (no C++ compiler)")


def _case(dtype: torch.dtype, channels: int = 24, size: int = 9,
          channels_last: bool = True) -> tuple[nn.BatchNorm2d, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels, eps=1e-3, momentum=0.03)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = (torch.randn(3, channels, size, size + 2) * 2 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape).to(dtype)
    return bn, x, grad


def _run(bn: nn.BatchNorm2d, x: torch.Tensor, grad: torch.Tensor, use_fused: bool):
    bn = copy.deepcopy(bn)
    x = x.clone().requires_grad_()
    y = fused.bn_silu(x, bn) if use_fused else F.silu(bn(x))
    y.backward(grad)
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var, bn


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_eager_batchnorm_and_silu(dtype, tol):
    bn, x, grad = _case(dtype)
    assert fused.fusable(x, bn)
    got, want = _run(bn, x, grad, True), _run(bn, x, grad, False)
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=torch.channels_last)
    for name, a, b in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"),
                          got[:6], want[:6], strict=True):
        assert _rel(a, b) < tol, (name, _rel(a, b))
    assert int(got[6].num_batches_tracked) == int(want[6].num_batches_tracked) == 1


def test_channel_count_not_a_multiple_of_the_tile():
    bn, x, grad = _case(torch.float32, channels=7, size=5)  # 1024 % 7 != 0, short last tile
    got, want = _run(bn, x, grad, True), _run(bn, x, grad, False)
    for a, b in zip(got[:6], want[:6], strict=True):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("case", ["eval", "nchw", "float64", "switched_off", "no_kernel"])
def test_everything_else_is_exactly_eager(case, monkeypatch):
    dtype = torch.float64 if case == "float64" else torch.float32
    bn, x, grad = _case(dtype, channels_last=case != "nchw")
    if case == "float64":
        bn = bn.double()
    if case == "eval":
        bn.eval()
    if case == "switched_off":
        monkeypatch.setenv(fused.SWITCH_ENV, "0")
    if case == "no_kernel":
        monkeypatch.setattr(fused, "extension", lambda: None)
    assert not fused.fusable(x, bn)
    got, want = _run(bn, x, grad, True), _run(bn, x, grad, False)
    for a, b in zip(got[:6], want[:6], strict=True):
        assert torch.equal(a, b)


def test_yolox_conv_blocks_train_through_the_kernel(monkeypatch):
    from accelcore import create_model

    model = create_model("yolox_nano", num_classes=3).to(memory_format=torch.channels_last)
    calls = []
    real = fused._FusedBnSilu.apply
    monkeypatch.setattr(fused._FusedBnSilu, "apply", lambda *a: calls.append(1) or real(*a))
    x = (torch.rand(2, 3, 64, 64) * 255).contiguous(memory_format=torch.channels_last)
    model.head(model.backbone(x))
    assert len(calls) > 50  # every Conv-BN-SiLU block of the network
    calls.clear()
    model.eval()
    with torch.no_grad():
        model.head(model.backbone(x))
    assert not calls


def test_statistics_hold_for_a_large_mean_and_a_small_spread():
    """E[x^2] - E[x]^2 in float would lose the variance here; the kernel shifts first."""
    bn, x, grad = _case(torch.float32)
    x = (x * 0.1 + 100.0).contiguous(memory_format=torch.channels_last)
    got, want = _run(bn, x, grad, True), _run(bn, x, grad, False)
    for name, a, b in zip(("y", "dx", "running_var"), (got[0], got[1], got[5]),
                          (want[0], want[1], want[5]), strict=True):
        assert _rel(a, b) < 1e-3, (name, _rel(a, b))


@pytest.mark.parametrize("channels", [16, 32, 48, 64, 128, 24, 7])
def test_bfloat16_matches_a_float64_reference_also_where_silu_saturates(channels):
    """bfloat16 takes hand-vectorised loops on AVX512-BF16 CPUs (16-128 channels in steps the
    register-blocked loops take: 16, 32, 48, 64, 128; 24: the per-tile vector loops; 7: the
    scalar tail only) with an exp and reciprocal accurate to bfloat16: checked against
    the same arithmetic in float64, on pre-activations reaching +-90 where exp over- and
    underflows in float."""
    bn, x, grad = _case(torch.bfloat16, channels=channels, size=17)
    with torch.no_grad():
        bn.weight.uniform_(30.0, 45.0)  # normalised x spans about +-3: z spans about +-100
        bn.weight[::2] *= -1
    got = _run(bn, x, grad, True)
    ref = _run(bn.double(), x.double(), grad.double(), False)
    assert torch.isfinite(got[0].float()).all() and torch.isfinite(got[1].float()).all()
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), got[:4], ref[:4], strict=True):
        assert _rel(a, b) < 2e-2, (name, _rel(a, b))
    # elementwise, the output is the reference rounded to bfloat16 (1 ulp: 2^-8 relative)
    y, want = got[0].double(), ref[0]
    assert ((y - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()


def test_float32_matches_a_float64_reference_also_where_silu_saturates():
    """float32 computes exp with its own polynomial: within 2e-7 of float64's exp on the reduced
    range, clamped where float overflows; checked on pre-activations reaching +-100."""
    bn, x, grad = _case(torch.float32, channels=24, size=17)
    with torch.no_grad():
        bn.weight.uniform_(30.0, 45.0)
        bn.weight[::2] *= -1
    got = _run(bn, x, grad, True)
    ref = _run(bn.double(), x.double(), grad.double(), False)
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), got[:4], ref[:4], strict=True):
        assert _rel(a, b) < 1e-5, (name, _rel(a, b))
    y, want = got[0].double(), ref[0]
    assert ((y - want).abs() <= want.abs() * 1e-5 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gradient_that_is_a_channel_slice_is_read_in_place(dtype):
    """A concatenation hands each piece a channel slice of its gradient (pixels strided by the
    wider channel count): the kernel reads it as it is, with the same result as a copy."""
    bn, x, _ = _case(dtype, channels=20)
    wide = torch.randn(3, 20 + 13, *x.shape[2:]).to(dtype)
    wide = wide.contiguous(memory_format=torch.channels_last)
    piece = wide[:, 5:25]
    assert not piece.is_contiguous(memory_format=torch.channels_last)
    got = _run(bn, x, piece, True)
    want = _run(bn, x, piece.contiguous(memory_format=torch.channels_last), True)
    for a, b in zip(got[:4], want[:4], strict=True):
        assert torch.equal(a, b)
    assert fused.reads_channel_slices(fused.bn_silu(x.clone().requires_grad_(), bn))
    assert not fused.reads_channel_slices(F.silu(x.clone().requires_grad_()))
