"""YOLOX loss: batched SimOTA equals a literal per-image implementation; training step works."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from accelcore_yolox.loss import simota_assign, yolox_loss
from accelcore_yolox.postprocess import make_grids

from accelcore import registry


def _reference_loss(raw, labels, input_hw, use_l1=False, radius=1.5):
    """Straightforward per-image SimOTA + losses, written step by step after the official
    ``YOLOXHead.get_losses`` / ``get_assignments`` / ``simota_matching`` (loops, full
    [G, M, C] BCE); slow but easy to audit."""
    raw = raw.float()
    grid, stride = make_grids(input_hw)
    s = stride[:, 0]
    boxes = torch.cat(((raw[..., :2] + grid) * stride, raw[..., 2:4].exp() * stride), -1)
    num_classes = raw.shape[-1] - 5
    centers_x, centers_y = (grid[:, 0] + 0.5) * s, (grid[:, 1] + 0.5) * s
    num_fg, num_gts = 0, 0
    l_iou, l_obj, l_cls, l_l1 = [], [], [], []
    for b in range(raw.shape[0]):
        gts = labels[b][labels[b].sum(-1) > 0]
        obj_target = torch.zeros(raw.shape[1])
        num_gts += len(gts)
        if len(gts):
            # geometry constraint
            gx, gy = gts[:, 1:2], gts[:, 2:3]
            r = s.unsqueeze(0) * radius
            in_c = (
                torch.stack(
                    [
                        centers_x - (gx - r),
                        (gx + r) - centers_x,
                        centers_y - (gy - r),
                        (gy + r) - centers_y,
                    ],
                    -1,
                )
                .min(-1)
                .values
                > 0
            )
            fg_mask = in_c.any(0)
            geo = in_c[:, fg_mask]
            cand = fg_mask.nonzero()[:, 0]
            pb = boxes[b, cand]
            # pairwise IoU
            ious = torch.zeros(len(gts), len(cand))
            for i, g in enumerate(gts[:, 1:5]):
                tl = torch.maximum(g[:2] - g[2:] / 2, pb[:, :2] - pb[:, 2:] / 2)
                br = torch.minimum(g[:2] + g[2:] / 2, pb[:, :2] + pb[:, 2:] / 2)
                inter = (br - tl).clamp(min=0).prod(-1)
                ious[i] = inter / (g[2:].prod() + pb[:, 2:].prod(-1) - inter)
            onehot = F.one_hot(gts[:, 0].long(), num_classes).float()
            p = (raw[b, cand, 5:].sigmoid() * raw[b, cand, 4:5].sigmoid()).sqrt()
            cls_cost = F.binary_cross_entropy(
                p.unsqueeze(0).repeat(len(gts), 1, 1),
                onehot.unsqueeze(1).repeat(1, len(cand), 1),
                reduction="none",
            ).sum(-1)
            cost = cls_cost + 3.0 * -torch.log(ious + 1e-8) + 1e6 * (~geo)
            # simota matching
            matching = torch.zeros_like(cost)
            k = min(10, len(cand))
            dyn = torch.clamp(ious.topk(k, 1).values.sum(1).int(), min=1)
            for i in range(len(gts)):
                matching[i, torch.topk(cost[i], int(dyn[i]), largest=False).indices] = 1
            multi = matching.sum(0) > 1
            if multi.any():
                best = cost[:, multi].argmin(0)
                matching[:, multi] = 0
                matching[best, multi] = 1
            fg = matching.sum(0) > 0
            gt_idx = matching[:, fg].argmax(0)
            pred_iou = (matching * ious).sum(0)[fg]
            anchors = cand[fg]
            num_fg += len(anchors)
            obj_target[anchors] = 1
            matched = gts[gt_idx]
            pa = boxes[b, anchors]
            tl = torch.maximum(pa[:, :2] - pa[:, 2:] / 2, matched[:, 1:3] - matched[:, 3:5] / 2)
            br = torch.minimum(pa[:, :2] + pa[:, 2:] / 2, matched[:, 1:3] + matched[:, 3:5] / 2)
            en = (tl < br).float().prod(-1)
            inter = (br - tl).prod(-1) * en
            iou = inter / (pa[:, 2:].prod(-1) + matched[:, 3:5].prod(-1) - inter + 1e-16)
            l_iou.append((1 - iou**2).sum())
            tgt = F.one_hot(matched[:, 0].long(), num_classes) * pred_iou.unsqueeze(-1)
            l_cls.append(
                F.binary_cross_entropy_with_logits(raw[b, anchors, 5:], tgt, reduction="sum")
            )
            sa = s[anchors].unsqueeze(-1)
            l1_t = torch.cat(
                (matched[:, 1:3] / sa - grid[anchors], torch.log(matched[:, 3:5] / sa + 1e-8)), -1
            )
            l_l1.append((raw[b, anchors, :4] - l1_t).abs().sum())
        l_obj.append(F.binary_cross_entropy_with_logits(raw[b, :, 4], obj_target, reduction="sum"))
    n = max(num_fg, 1)
    out = {
        "iou_loss": 5.0 * sum(l_iou, torch.tensor(0.0)) / n,
        "conf_loss": sum(l_obj) / n,
        "cls_loss": sum(l_cls, torch.tensor(0.0)) / n,
        "l1_loss": sum(l_l1, torch.tensor(0.0)) / n if use_l1 else torch.tensor(0.0),
        "num_fg": torch.tensor(num_fg / max(num_gts, 1)),
    }
    out["total_loss"] = out["iou_loss"] + out["conf_loss"] + out["cls_loss"] + out["l1_loss"]
    return out


def _random_targets(gen, batch, max_labels, input_hw, num_classes, counts):
    h, w = input_hw
    t = torch.zeros(batch, max_labels, 5)
    for b, n in enumerate(counts):
        wh = torch.rand(n, 2, generator=gen) * torch.tensor([w * 0.5, h * 0.5]) + 4
        c = torch.rand(n, 2, generator=gen) * torch.tensor([w, h])
        t[b, :n, 0] = torch.randint(0, num_classes, (n,), generator=gen).float()
        t[b, :n, 1:3] = c
        t[b, :n, 3:5] = wh
    return t


def _raw_near_targets(gen, batch, input_hw, num_classes):
    n = sum(h * w for h, w in ((input_hw[0] // s, input_hw[1] // s) for s in (8, 16, 32)))
    raw = torch.randn(batch, n, 5 + num_classes, generator=gen)
    raw[..., 2:4] = raw[..., 2:4] * 0.5 + 1.0  # boxes of a few strides: IoUs spread over (0, 1)
    return raw


@pytest.mark.parametrize("use_l1", [False, True])
def test_batched_loss_matches_per_image_reference(use_l1):
    gen = torch.Generator().manual_seed(1)
    hw, C = (128, 160), 6
    # image 2 has no objects, image 3 has its labels after a padding row
    labels = _random_targets(gen, 4, 12, hw, C, counts=[9, 1, 0, 5])
    labels[3] = torch.cat((torch.zeros(1, 5), labels[3, :-1]))
    # two gts with the same centre force anchors claimed by several gts
    labels[0, 1, 1:3] = labels[0, 0, 1:3]
    raw = _raw_near_targets(gen, 4, hw, C)
    ours = yolox_loss(raw.clone().requires_grad_(True), labels, hw, use_l1=use_l1)
    ref = _reference_loss(raw, labels, hw, use_l1=use_l1)
    for key, value in ref.items():
        assert torch.allclose(ours[key].detach(), value, rtol=1e-5, atol=1e-5), (
            key,
            ours[key],
            value,
        )
    assert ours["num_fg"] > 0 and ours["iou_loss"] > 0 and ours["cls_loss"] > 0
    assert (ours["l1_loss"] > 0) == use_l1


def test_assignment_handles_multi_claims_and_padding():
    gen = torch.Generator().manual_seed(3)
    hw, C = (128, 128), 3
    labels = _random_targets(gen, 2, 6, hw, C, counts=[6, 2])
    labels[0, :, 1:3] = labels[0, 0, 1:3]  # six gts on one centre: heavy competition
    raw = _raw_near_targets(gen, 2, hw, C)
    asg = simota_assign(raw, labels, hw)
    pairs = set(zip(asg.batch_idx.tolist(), asg.anchor_idx.tolist(), strict=True))
    assert len(pairs) == asg.num_fg  # every anchor has at most one gt
    assert set(asg.batch_idx.tolist()) == {0, 1}
    assert (asg.iou >= 0).all() and (asg.iou <= 1).all()
    ref = _reference_loss(raw, labels, hw)
    ours = yolox_loss(raw, labels, hw)
    assert torch.allclose(ours["total_loss"], ref["total_loss"], rtol=1e-5)


def test_no_objects_gives_objectness_only():
    raw = torch.randn(2, 8 * 8 + 4 * 4 + 2 * 2, 8, requires_grad=True)
    out = yolox_loss(raw, torch.zeros(2, 5, 5), (64, 64))
    assert out["num_fg"] == 0 and out["iou_loss"] == 0 and out["cls_loss"] == 0
    assert out["conf_loss"] > 0 and torch.isfinite(out["total_loss"])
    out["total_loss"].backward()
    assert raw.grad[..., 4].abs().sum() > 0 and raw.grad[..., 5:].abs().sum() == 0


def test_bad_class_index_is_reported():
    raw = torch.randn(1, 84, 8)
    labels = torch.tensor([[[5.0, 30, 30, 10, 10]]])
    with pytest.raises(ValueError, match="class index"):
        yolox_loss(raw, labels, (64, 64))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return registry.create_model("yolox_nano", num_classes=3)


def _batch():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 96, generator=gen) * 255
    targets = torch.zeros(2, 4, 5)
    targets[0, 0] = torch.tensor([1.0, 30, 20, 24, 18])
    targets[0, 1] = torch.tensor([2.0, 70, 40, 30, 40])
    targets[1, 0] = torch.tensor([0.0, 48, 32, 60, 50])
    return images, targets


def test_train_step(model):
    model.train()
    images, targets = _batch()
    assert model(images, targets)["l1_loss"] == 0  # official: no L1 while augmenting
    model.start_no_augmentation()  # the Detector switch the loop calls for the no-aug epochs
    try:
        losses = model(images, targets)
    finally:
        model.head.use_l1 = False
    assert set(losses) == set(model.loss_keys) == {
        "total_loss", "iou_loss", "l1_loss", "conf_loss", "cls_loss", "num_fg"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["num_fg"] > 0 and losses["l1_loss"] > 0
    model.zero_grad()
    losses["total_loss"].backward()
    for name in (
        "backbone.backbone.stem.conv.conv.weight",
        "head.cls_preds.0.weight",
        "head.reg_preds.0.weight",
        "head.obj_preds.2.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="targets"):
        model(images)


def test_loss_is_fp32_under_bf16_autocast(model):
    model.train()
    images, targets = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.backbone(images)
        raw = model.head(features)
        losses = model(images, targets)
    assert all(f.dtype == torch.bfloat16 for f in features)  # the network really ran in bf16
    assert raw.dtype == torch.float32  # the prediction convs run in fp32 when training
    assert all(v.dtype == torch.float32 for v in losses.values())
    # same as computing the loss from that output outside autocast
    ref = yolox_loss(raw, targets, (64, 96))
    assert torch.allclose(losses["total_loss"], ref["total_loss"], rtol=1e-4)
    assert math.isfinite(float(losses["total_loss"].detach()))
