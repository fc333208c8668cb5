"""The native 2x2 space-to-depth equals YOLOX's four slices + concat, and YOLOX trains with it."""

from __future__ import annotations

import pytest
import torch

from accelcore.training import space_to_depth as s2d


def _reference(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]),
                     dim=1)


def _batch(channels: int, h: int = 10, w: int = 14) -> torch.Tensor:
    g = torch.Generator().manual_seed(channels)
    x = torch.rand(2, channels, h, w, generator=g) * 255
    return x.contiguous(memory_format=torch.channels_last)


needs_kernel = pytest.mark.skipif(s2d.extension() is None,
                                  reason="the C++ kernel cannot be built here")


@needs_kernel
@pytest.mark.parametrize("channels", [3, 5])
def test_native_equals_slices_and_concat(channels: int):
    x = _batch(channels)
    y = s2d.space_to_depth(x)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, _reference(x))
    # Under bf16 autocast it is already the bf16 input of the next conv (round to nearest
    # even): the values are those of the reference rounded as autocast would.
    x = x + 0.3  # values a bfloat16 cannot hold exactly, so the rounding is exercised
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = s2d.space_to_depth(x)
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, _reference(x).bfloat16())


@needs_kernel
def test_falls_back_where_the_kernel_does_not_fit(monkeypatch):
    calls = []
    real = s2d.extension()

    class Spy:
        def space_to_depth(self, x, bf16):
            calls.append(bf16)
            return real.space_to_depth(x, bf16)

    monkeypatch.setattr(s2d, "extension", lambda: Spy())
    s2d.space_to_depth(_batch(3))
    assert calls == [False]
    nchw = _batch(3).contiguous()
    wants_grad = _batch(3).requires_grad_()
    for x in (nchw, wants_grad, _batch(3).double()):
        assert torch.equal(s2d.space_to_depth(x), _reference(x))
    monkeypatch.setenv(s2d.SWITCH_ENV, "0")
    assert torch.equal(s2d.space_to_depth(_batch(3)), _reference(_batch(3)))
    monkeypatch.delenv(s2d.SWITCH_ENV)
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        s2d.space_to_depth(_batch(3, h=9))  # odd height: the plain ops' own error
    assert calls == [False]  # none of them went native
    y = s2d.space_to_depth(wants_grad)
    y.sum().backward()  # the fallback keeps the input's gradient
    assert torch.equal(wants_grad.grad, torch.ones_like(wants_grad))


def test_yolox_focus_trains_through_it_and_infers_with_plain_ops(monkeypatch):
    from accelcore import create_model

    torch.manual_seed(0)
    focus = create_model("yolox_nano", num_classes=3).backbone.backbone.stem
    seen = []
    real = s2d.space_to_depth
    monkeypatch.setattr("accelcore_yolox.models.blocks.space_to_depth",
                        lambda x: seen.append(tuple(x.shape)) or real(x))
    x = _batch(3, 32, 32)
    focus.train()
    assert focus(x).shape == (2, 16, 16, 16)
    focus.eval()
    with torch.no_grad():
        focus(x)
    assert seen == [(2, 3, 32, 32)]  # training only; inference keeps the traceable ops
