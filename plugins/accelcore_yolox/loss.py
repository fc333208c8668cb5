"""YOLOX training loss: SimOTA label assignment + IoU / objectness / classification / L1 losses.

Follows the current official YOLOX (``YOLOXHead.get_losses``): candidates are the anchors whose
centre lies within ``center_radius`` (1.5) strides of a ground-truth centre; the cost is
``cls BCE + 3 * (-log IoU) + 1e6 * outside``; each gt takes its ``dynamic_k`` = int(sum of its
top-10 IoUs) cheapest anchors; an anchor claimed by several gts goes to the cheapest. Losses:
5 x (1 - IoU^2), BCE objectness over all anchors, BCE classification against one-hot x IoU, and
optionally L1 on the raw regression, each summed and divided by the number of positives.

Unlike the official per-image loop, the assignment is batched: gts are padded to the batch's
maximum count and candidate anchors gathered into a padded ``[B, M]`` set, so a batch costs a
handful of tensor ops regardless of its size. Everything runs in fp32, outside autocast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .postprocess import DEFAULT_STRIDES, decode_boxes, make_grids

IOU_WEIGHT = 5.0
CENTER_RADIUS = 1.5  # official value since YOLOX 0.3 (the paper's 2.5 + in-box test was dropped)
CANDIDATE_TOPK = 10
OUTSIDE_COST = 1e6


@dataclass
class Assignment:
    """Positive anchors of a batch: image index, anchor index, matched gt row, IoU with it."""

    batch_idx: torch.Tensor  # [F] long
    anchor_idx: torch.Tensor  # [F] long
    gt: torch.Tensor  # [F, 5] (cls, cx, cy, w, h) of the matched gt
    iou: torch.Tensor  # [F] IoU of the predicted box with the matched gt

    @property
    def num_fg(self) -> int:
        return int(self.batch_idx.numel())


def pairwise_iou_cxcywh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU between every box of ``a [..., G, 4]`` and ``b [..., M, 4]`` -> ``[..., G, M]``."""
    a = a.unsqueeze(-2)
    b = b.unsqueeze(-3)
    tl = torch.maximum(a[..., :2] - a[..., 2:] / 2, b[..., :2] - b[..., 2:] / 2)
    br = torch.minimum(a[..., :2] + a[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2)
    inter = (br - tl).clamp(min=0).prod(-1)
    union = a[..., 2:].prod(-1) + b[..., 2:].prod(-1) - inter
    # The clamp only matters for two zero-area boxes (official would give NaN there).
    return inter / union.clamp(min=1e-12)


def iou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Official IOUloss (loss_type "iou"): ``1 - IoU^2`` per matched pair of cxcywh boxes."""
    tl = torch.maximum(pred[:, :2] - pred[:, 2:] / 2, target[:, :2] - target[:, 2:] / 2)
    br = torch.minimum(pred[:, :2] + pred[:, 2:] / 2, target[:, :2] + target[:, 2:] / 2)
    inter = (br - tl).clamp(min=0).prod(-1)
    union = pred[:, 2:].prod(-1) + target[:, 2:].prod(-1) - inter
    iou = inter / (union + 1e-16)
    return 1 - iou**2


def _compact_gts(labels: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move valid gt rows to the front and cut the padding to the batch's largest count."""
    g_max = int(valid.sum(1).max())
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :g_max]
    labels = labels.gather(1, order.unsqueeze(-1).expand(-1, -1, labels.shape[-1]))
    return labels, valid.gather(1, order)


@torch.no_grad()
def simota_assign(
    boxes: torch.Tensor,
    obj_logits: torch.Tensor,
    cls_logits: torch.Tensor,
    labels: torch.Tensor,
    grid: torch.Tensor,
    stride: torch.Tensor,
    center_radius: float = CENTER_RADIUS,
) -> Assignment:
    """Batched SimOTA.

    ``boxes [B, A, 4]`` decoded predictions (cxcywh), ``obj_logits [B, A]``, ``cls_logits
    [B, A, C]``, ``labels [B, G, 5]`` (cls, cx, cy, w, h; all-zero rows = padding; a row counts
    when its sum is > 0, as official), ``grid [A, 2]``, ``stride [A, 1]``. All float32.
    """
    dev = boxes.device
    num_classes = cls_logits.shape[-1]
    empty = Assignment(
        torch.zeros(0, dtype=torch.long, device=dev),
        torch.zeros(0, dtype=torch.long, device=dev),
        labels.new_zeros((0, 5)),
        boxes.new_zeros(0),
    )
    valid = labels.sum(-1) > 0
    if labels.shape[1] == 0 or not bool(valid.any()):
        return empty
    labels, valid = _compact_gts(labels, valid)
    B, G = valid.shape

    # Geometry prior: anchor centre within center_radius strides of the gt centre.
    centers = (grid + 0.5) * stride  # [A, 2]
    radius = (stride * center_radius).squeeze(-1)  # [A]
    in_center = valid.unsqueeze(-1)
    for d in range(2):
        ac = centers[:, d]
        gc = labels[..., 1 + d].unsqueeze(-1)  # [B, G, 1]
        in_center = in_center & (ac - (gc - radius) > 0) & ((gc + radius) - ac > 0)
    candidate = in_center.any(1)  # [B, A]
    counts = candidate.sum(1)
    m = int(counts.max())
    if m == 0:
        return empty

    # Gather each image's candidate anchors (original order) into a padded [B, M] set.
    cand_idx = torch.argsort((~candidate).to(torch.int8), dim=1, stable=True)[:, :m]
    cand_valid = torch.arange(m, device=dev) < counts.unsqueeze(1)  # [B, M]
    pair_valid = valid.unsqueeze(2) & cand_valid.unsqueeze(1)  # [B, G, M]
    geometry = in_center.gather(2, cand_idx.unsqueeze(1).expand(B, G, m)) & pair_valid
    pred = boxes.gather(1, cand_idx.unsqueeze(-1).expand(B, m, 4))
    cls = cls_logits.gather(1, cand_idx.unsqueeze(-1).expand(B, m, num_classes))
    obj = obj_logits.gather(1, cand_idx)

    ious = pairwise_iou_cxcywh(labels[..., 1:5], pred).masked_fill(~pair_valid, 0.0)
    iou_cost = -torch.log(ious + 1e-8)

    # Sum over classes of BCE(sqrt(p_cls * p_obj), one_hot(gt class)) without materialising
    # [B, G, M, C]: all classes as negatives, then swap the gt class's term for the positive one.
    # Logs are clamped at -100 like F.binary_cross_entropy.
    p = (cls.sigmoid() * obj.sigmoid().unsqueeze(-1)).sqrt()
    log_p = torch.log(p).clamp(min=-100).transpose(1, 2)  # [B, C, M]
    log_1mp = torch.log1p(-p).clamp(min=-100).transpose(1, 2)
    gt_cls = labels[..., 0].long().clamp(0, num_classes - 1).unsqueeze(-1).expand(B, G, m)
    cls_cost = (
        -log_1mp.sum(1, keepdim=True) - log_p.gather(1, gt_cls) + log_1mp.gather(1, gt_cls)
    )

    cost = cls_cost + 3.0 * iou_cost + OUTSIDE_COST * (~geometry).float()
    cost = cost.masked_fill(~pair_valid, float("inf"))

    # dynamic k per gt; padded candidates have IoU 0, so they do not change the top-k sum.
    k = min(CANDIDATE_TOPK, m)
    dynamic_k = ious.topk(k, dim=2).values.sum(-1).int().clamp(min=1)  # [B, G]
    pos_cost, pos = cost.topk(k, dim=2, largest=False)
    take = (torch.arange(k, device=dev) < dynamic_k.unsqueeze(-1)) & torch.isfinite(pos_cost)
    matching = torch.zeros_like(cost, dtype=torch.bool).scatter_(2, pos, take)

    # An anchor claimed by several gts goes to the gt with the lowest cost (over all gts).
    n_match = matching.sum(1)  # [B, M]
    multi = n_match > 1
    if bool(multi.any()):
        best = cost.argmin(1, keepdim=True)  # [B, 1, M]
        one = torch.arange(G, device=dev).view(1, G, 1) == best
        matching = torch.where(multi.unsqueeze(1), one, matching)
    fg = n_match > 0

    matched_gt = matching.to(torch.uint8).argmax(1)  # [B, M]
    matched_iou = (matching * ious).sum(1)
    fb, fm = fg.nonzero(as_tuple=True)
    g_idx = matched_gt[fb, fm]
    return Assignment(fb, cand_idx[fb, fm], labels[fb, g_idx], matched_iou[fb, fm])


def yolox_loss(
    raw: torch.Tensor,
    targets: torch.Tensor,
    input_hw: Sequence[int],
    strides: Sequence[int] = DEFAULT_STRIDES,
    use_l1: bool = False,
    center_radius: float = CENTER_RADIUS,
) -> dict[str, torch.Tensor]:
    """Official YOLOX losses from raw head output ``[B, N, 5 + C]``.

    ``targets [B, max_labels, 5]`` = (cls, cx, cy, w, h) in input pixels, zero rows = padding.
    Returns ``total_loss, iou_loss (x5 weighted, as official), l1_loss, conf_loss, cls_loss`` and
    ``num_fg`` (positives per gt, as official reports it), all 0-dim float32 tensors.
    """
    with torch.autocast(device_type=raw.device.type, enabled=False):
        raw = raw.float()
        labels = targets.to(device=raw.device, dtype=torch.float32)
        num_classes = raw.shape[-1] - 5
        grid, stride = make_grids(input_hw, strides, raw.device)
        if raw.shape[1] != grid.shape[0]:
            raise ValueError(
                f"head output has {raw.shape[1]} anchors, input {tuple(input_hw)} implies "
                f"{grid.shape[0]}"
            )
        valid = labels.sum(-1) > 0
        if labels.numel() and bool(valid.any()):
            cls_vals = labels[..., 0][valid]
            if bool((cls_vals < 0).any()) or bool((cls_vals >= num_classes).any()):
                raise ValueError(
                    f"target class index out of range [0, {num_classes}): "
                    f"min {cls_vals.min().item():g}, max {cls_vals.max().item():g}"
                )

        boxes = decode_boxes(raw[..., :4], grid, stride)
        obj_logits = raw[..., 4]
        cls_logits = raw[..., 5:]
        asg = simota_assign(
            boxes.detach(), obj_logits.detach(), cls_logits.detach(), labels, grid, stride,
            center_radius,
        )
        bi, ai = asg.batch_idx, asg.anchor_idx
        norm = float(max(asg.num_fg, 1))

        obj_target = torch.zeros_like(obj_logits)
        obj_target[bi, ai] = 1.0
        loss_obj = F.binary_cross_entropy_with_logits(obj_logits, obj_target, reduction="sum") / norm
        loss_iou = IOU_WEIGHT * iou_loss(boxes[bi, ai], asg.gt[:, 1:5]).sum() / norm
        cls_target = F.one_hot(asg.gt[:, 0].long(), num_classes).float() * asg.iou.unsqueeze(-1)
        loss_cls = (
            F.binary_cross_entropy_with_logits(cls_logits[bi, ai], cls_target, reduction="sum")
            / norm
        )
        if use_l1:
            s = stride[ai]
            l1_target = torch.cat(
                (asg.gt[:, 1:3] / s - grid[ai], torch.log(asg.gt[:, 3:5] / s + 1e-8)), dim=-1
            )
            loss_l1 = (raw[bi, ai, :4] - l1_target).abs().sum() / norm
        else:
            loss_l1 = raw.new_zeros(())
        total = loss_iou + loss_obj + loss_cls + loss_l1
        num_gts = max(int(valid.sum()), 1)
    return {
        "total_loss": total,
        "iou_loss": loss_iou,
        "l1_loss": loss_l1,
        "conf_loss": loss_obj,
        "cls_loss": loss_cls,
        "num_fg": raw.new_tensor(asg.num_fg / num_gts),
    }
