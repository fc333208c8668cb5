"""Training-graph rewrites that must leave the function unchanged: the channel concat with
contiguous gradient pieces, SPP's chained max pools, and the lean step switched off as a whole."""

from __future__ import annotations

import copy

import pytest
import torch
from accelcore_yolox.models.blocks import SPPBottleneck, chainable, chained_max_pools
from torch import nn

from accelcore.training.layout import channel_cat

CL = torch.channels_last


def _parts(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(2, c, 5, 6, dtype=dtype).contiguous(memory_format=CL).requires_grad_()
            for c in (3, 4, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_cat_is_cat_with_contiguous_gradients(dtype):
    parts, twins = _parts(dtype), _parts(dtype)
    out, want = channel_cat(parts), torch.cat(twins, dim=1)
    assert out.grad_fn is not None and "ChannelCat" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad = torch.randn_like(out).contiguous(memory_format=CL)
    out.backward(grad)
    want.backward(grad)
    for got, ref in zip(parts, twins, strict=True):
        assert got.grad.is_contiguous(memory_format=CL)
        torch.testing.assert_close(got.grad, ref.grad, rtol=0, atol=0)


def test_a_piece_from_the_fused_bn_silu_gets_its_gradient_slice_without_a_copy():
    from accelcore.training import bn_silu

    if bn_silu.extension() is None:
        pytest.skip("the BN+SiLU kernel cannot be built here")
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    x = torch.randn(2, 4, 5, 6).contiguous(memory_format=CL).requires_grad_()
    other = torch.randn(2, 3, 5, 6).contiguous(memory_format=CL).requires_grad_()
    fused_piece = bn_silu.bn_silu(x, bn)
    received = {}
    fused_piece.register_hook(lambda g: received.setdefault("fused", g))
    other.register_hook(lambda g: received.setdefault("other", g))
    out = channel_cat([other, fused_piece])
    grad = torch.randn_like(out).contiguous(memory_format=CL)
    out.backward(grad)
    assert received["fused"].stride()[1] == 1 and received["fused"].stride()[3] == 7  # a slice
    assert received["other"].is_contiguous(memory_format=CL)  # not the kernel's: a copy
    torch.testing.assert_close(received["fused"], grad[:, 3:], rtol=0, atol=0)
    torch.testing.assert_close(other.grad, grad[:, :3], rtol=0, atol=0)
    twin = x.detach().clone().requires_grad_()
    torch.nn.functional.silu(bn(twin)).backward(grad[:, 3:])
    torch.testing.assert_close(x.grad, twin.grad, rtol=1e-5, atol=1e-6)


def test_channel_cat_is_plain_cat_where_nothing_is_gained():
    parts = _parts()
    with torch.no_grad():
        assert channel_cat(parts).grad_fn is None
    nchw = [p.detach().contiguous().requires_grad_() for p in parts]
    assert "ChannelCat" not in type(channel_cat(nchw).grad_fn).__name__
    frozen = [p.detach() for p in parts]
    assert channel_cat(frozen).grad_fn is None
    torch.testing.assert_close(channel_cat(frozen), torch.cat(frozen, 1))


def test_chained_max_pools_equal_the_direct_pools():
    spp = SPPBottleneck(16, 16)
    # continuous random values: no ties, so the gradients route to the same maxima too
    x = torch.randn(2, 8, 13, 11, dtype=torch.float64).contiguous(memory_format=CL)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = chained_max_pools(xa, spp.m)
    want = [pool(xb) for pool in spp.m]
    weights = [torch.randn_like(w) for w in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    sum((g * k).sum() for g, k in zip(got, weights, strict=True)).backward()
    sum((w * k).sum() for w, k in zip(want, weights, strict=True)).backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    # any growing odd sizes, not only YOLOX's (5, 9, 13)
    pools = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in (3, 7, 9))
    for g, pool in zip(chained_max_pools(x, pools), pools, strict=True):
        torch.testing.assert_close(g, pool(x), rtol=0, atol=0)


def test_only_growing_odd_same_pools_are_chained():
    def pools(*specs):
        return nn.ModuleList(nn.MaxPool2d(*spec) for spec in specs)

    assert chainable(SPPBottleneck(16, 16).m)
    assert chainable(pools((3, 1, 1), (7, 1, 3)))
    assert not chainable(pools((9, 1, 4), (5, 1, 2)))  # shrinking
    assert not chainable(pools((5, 1, 2), (5, 1, 2)))  # repeated
    assert not chainable(pools((4, 1, 2)))  # even
    assert not chainable(pools((5, 2, 2)))  # strided
    assert not chainable(pools((5, 1, 0)))  # not 'same'
    assert not chainable(nn.ModuleList([nn.AvgPool2d(5, 1, 2)]))


def _graph_nodes(out: torch.Tensor) -> set[str]:
    """Names of every autograd node behind ``out``."""
    seen, names, todo = set(), set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(nxt for nxt, _ in node.next_functions)
    return names


def test_lean_step_switched_off_trains_the_plain_graph_to_the_same_values(monkeypatch):
    from accelcore import registry
    from accelcore.training import lean_step

    torch.manual_seed(0)
    model = registry.create_model("yolox_nano", num_classes=3).to(memory_format=CL).train()
    x = torch.rand(2, 3, 96, 128).contiguous(memory_format=CL)
    weights = None
    results = {}
    for on in ("1", "0"):
        monkeypatch.setenv(lean_step.SWITCH_ENV, on)
        twin = copy.deepcopy(model)
        out = twin.head(twin.backbone(x))  # the raw training outputs, before the loss
        weights = torch.randn_like(out) if weights is None else weights
        nodes = _graph_nodes(out)
        (out * weights).sum().backward()
        results[on] = (out.detach(), [p.grad for p in twin.parameters()], nodes)
    (lean_out, lean_grads, lean_nodes), (plain_out, plain_grads, plain_nodes) = (
        results["1"], results["0"])
    # On: the lean graph (channel concats, and the fused BN+SiLU where it can be built here).
    assert any("ChannelCat" in n for n in lean_nodes)
    # Off: nothing but torch's own autograd nodes, no concat or kernel of ours.
    assert not any(n.startswith("_") for n in plain_nodes), sorted(plain_nodes)
    assert not any("Fused" in n or "ChannelCat" in n or "KernelGrad" in n for n in plain_nodes)
    # Float rounding differs (fused statistics, one box + objectness conv), the function does
    # not: both are within ~4e-4 of a float64 run per parameter (relative norm of the error).
    def close(got: torch.Tensor, want: torch.Tensor) -> bool:
        return bool((got - want).norm() <= 2e-3 * want.norm())

    assert close(lean_out, plain_out)
    assert all(close(got, want) for got, want in zip(lean_grads, plain_grads, strict=True))
