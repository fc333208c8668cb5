"""LR schedule shape (YOLOX quadwarm_cos_flat), optimizer groups and EMA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from accelcore.config import TrainConfig
from accelcore.training.ema import ModelEMA
from accelcore.training.lr_scheduler import LRScheduler
from accelcore.training.optim import build_optimizer, param_groups


def make_sched(**kw):
    args = dict(warmup_epochs=2, warmup_lr_start=0.0, no_aug_epochs=3, min_lr_ratio=0.05)
    args.update(kw)
    return LRScheduler("quadwarm_cos_flat", 0.01, 10, 20, **args)


def test_warmup_is_quadratic():
    s = make_sched()
    assert s.lr_at(0) == 0.0
    assert s.lr_at(20) == pytest.approx(0.01)  # end of 2 warmup epochs × 10 it
    for it in (1, 5, 10, 15):
        assert s.lr_at(it) == pytest.approx(0.01 * (it / 20) ** 2)
    # quadratic, not linear: the midpoint is a quarter of the peak
    assert s.lr_at(10) == pytest.approx(0.25 * s.lr_at(20))


def test_cosine_then_constant_tail():
    s = make_sched()
    min_lr = 0.01 * 0.05
    total, tail = 200, 30
    span = total - 20 - tail
    for it in (21, 50, 100, 169):
        expected = min_lr + 0.5 * (0.01 - min_lr) * (1 + math.cos(math.pi * (it - 20) / span))
        assert s.lr_at(it) == pytest.approx(expected)
    lrs = [s.lr_at(it) for it in range(20, total - tail)]
    assert all(a >= b for a, b in zip(lrs[:-1], lrs[1:], strict=True)), "cosine must decrease"
    assert all(s.lr_at(it) == pytest.approx(min_lr) for it in range(total - tail, total + 5))


def test_warmup_start_and_other_schedules():
    s = make_sched(warmup_lr_start=0.001)
    assert s.lr_at(0) == pytest.approx(0.001)
    assert LRScheduler("constant", 0.02, 10, 5).lr_at(37) == 0.02
    w = LRScheduler("warmcos", 0.01, 10, 10, warmup_epochs=1)
    assert w.lr_at(5) == pytest.approx(0.005)  # linear warmup
    assert w.lr_at(100) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        LRScheduler("step", 0.01, 10, 10)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)  # with bias
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        x = self.head(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(x)


def test_param_groups_and_decay():
    model = Tiny()
    no_decay, decay, biases = param_groups(model)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(no_decay) == {id(model.bn.weight)}
    assert ids(decay) == {id(model.conv.weight), id(model.head.weight), id(model.fc.weight)}
    assert ids(biases) == {id(model.bn.bias), id(model.head.bias), id(model.fc.bias)}
    total = len(no_decay) + len(decay) + len(biases)
    assert total == len(list(model.parameters()))
    opt = build_optimizer(model, TrainConfig(weight_decay=5e-4), lr=0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-4, 0.0]
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)


def test_decay_only_shrinks_decayed_group():
    model = Tiny()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero loss gradient: only weight decay moves weights
    opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (name in {"conv.weight", "head.weight", "fc.weight"}), name


def test_ema_update_matches_formula():
    model = Tiny()
    ema = ModelEMA(model, decay=0.9998)
    ema_w0 = ema.ema.conv.weight.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.bn.running_mean.add_(2.0)
    ema.update(model)
    d = 0.9998 * (1 - math.exp(-1 / 2000))
    assert ema.updates == 1
    torch.testing.assert_close(ema.ema.conv.weight, d * ema_w0 + (1 - d) * model.conv.weight)
    torch.testing.assert_close(ema.ema.bn.running_mean, (1 - d) * model.bn.running_mean)
    # integer buffers are not averaged; EMA params never require grad
    assert ema.ema.bn.num_batches_tracked.item() == 0
    assert not any(p.requires_grad for p in ema.ema.parameters())
    # the ramp approaches the base decay
    assert ema.decay(10**6) == pytest.approx(0.9998)
    state = ema.state_dict()
    other = ModelEMA(Tiny())
    other.load_state_dict(state)
    assert other.updates == 1
    torch.testing.assert_close(other.ema.conv.weight, ema.ema.conv.weight)
