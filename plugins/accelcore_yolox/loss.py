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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .postprocess import DEFAULT_STRIDES, decode_boxes, level_shapes, make_grids

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


def _center_candidates(
    gt_xy: torch.Tensor,
    valid: torch.Tensor,
    input_hw: Sequence[int],
    strides: Sequence[int],
    center_radius: float,
) -> torch.Tensor:
    """``[B, A]`` mask of anchors whose centre is strictly within ``center_radius`` strides of
    some valid gt centre (official ``get_geometry_constraint``, same float formula).

    Per level only cells within ``ceil(center_radius) + 1`` of the gt's cell are tested, which
    is a superset of the qualifying ones, so the result equals the all-anchor test.
    """
    B = gt_xy.shape[0]
    total = sum(h * w for h, w in level_shapes(input_hw, strides))
    mask = torch.zeros(B * total, dtype=torch.bool, device=gt_xy.device)
    reach = int(math.ceil(center_radius)) + 1
    offs = torch.arange(-reach, reach + 1, device=gt_xy.device)
    batch_base = (torch.arange(B, device=gt_xy.device) * total).view(B, 1, 1, 1)
    start = 0
    for (h, w), s in zip(level_shapes(input_hw, strides), strides, strict=True):
        r = s * center_radius
        ok = []
        cells = []
        for d, size in ((0, w), (1, h)):
            g = gt_xy[..., d].unsqueeze(-1)  # [B, G, 1]
            i = torch.floor(g / s).long() + offs  # [B, G, K]
            c = (i.float() + 0.5) * s
            ok.append((c - (g - r) > 0) & ((g + r) - c > 0) & (i >= 0) & (i < size))
            cells.append(i)
        sel = ok[1].unsqueeze(-1) & ok[0].unsqueeze(-2) & valid.view(B, -1, 1, 1)  # [B,G,Ky,Kx]
        idx = batch_base + start + cells[1].unsqueeze(-1) * w + cells[0].unsqueeze(-2)
        mask[idx[sel]] = True
        start += h * w
    return mask.view(B, total)


@torch.no_grad()
def simota_assign(
    raw: torch.Tensor,
    labels: torch.Tensor,
    input_hw: Sequence[int],
    strides: Sequence[int] = DEFAULT_STRIDES,
    center_radius: float = CENTER_RADIUS,
) -> Assignment:
    """Batched SimOTA on raw head output ``[B, A, 5 + C]`` (fp32).

    ``labels [B, G, 5]`` = (cls, cx, cy, w, h); all-zero rows are padding (a row counts when its
    sum is > 0, as official). Anchors are laid out as by ``make_grids(input_hw, strides)``.
    """
    raw = raw.detach()
    dev = raw.device
    num_classes = raw.shape[-1] - 5
    empty = Assignment(
        torch.zeros(0, dtype=torch.long, device=dev),
        torch.zeros(0, dtype=torch.long, device=dev),
        labels.new_zeros((0, 5)),
        raw.new_zeros(0),
    )
    valid = labels.sum(-1) > 0
    if labels.shape[1] == 0 or not bool(valid.any()):
        return empty
    labels, valid = _compact_gts(labels, valid)
    B, G = valid.shape

    # Geometry prior: anchor centre strictly within center_radius strides of a gt centre.
    # Only a few cells per level and gt can qualify, so test those instead of all anchors.
    candidate = _center_candidates(labels[..., 1:3], valid, input_hw, strides, center_radius)
    counts = candidate.sum(1)
    m = int(counts.max())
    if m == 0:
        return empty

    # Gather each image's candidate anchors (original order) into a padded [B, M] set; only
    # these are decoded and scored (official does the same per image with its anchor filter).
    cand_idx = torch.argsort((~candidate).to(torch.int8), dim=1, stable=True)[:, :m]
    cand_valid = torch.arange(m, device=dev) < counts.unsqueeze(1)  # [B, M]
    pair_valid = valid.unsqueeze(2) & cand_valid.unsqueeze(1)  # [B, G, M]
    rows = torch.arange(B, device=dev).unsqueeze(1)
    cand = raw[rows, cand_idx]  # [B, M, 5 + C], contiguous
    grid, stride = make_grids(input_hw, strides, dev)
    grid, stride = grid[cand_idx], stride[cand_idx]  # [B, M, 2], [B, M, 1]
    pred = decode_boxes(cand[..., :4], grid, stride)

    centers = (grid + 0.5) * stride
    radius = (stride * center_radius).squeeze(-1).unsqueeze(1)  # [B, 1, M]
    geometry = pair_valid
    for d in range(2):
        ac = centers[..., d].unsqueeze(1)  # [B, 1, M]
        gc = labels[..., 1 + d].unsqueeze(-1)  # [B, G, 1]
        geometry = geometry & (ac - (gc - radius) > 0) & ((gc + radius) - ac > 0)

    ious = pairwise_iou_cxcywh(labels[..., 1:5], pred).masked_fill_(~pair_valid, 0.0)

    # Sum over classes of BCE(sqrt(p_cls * p_obj), one_hot(gt class)) without materialising
    # [B, G, M, C]: all classes as negatives, then swap the gt class's term for the positive one.
    # Logs are clamped at -100 like F.binary_cross_entropy.
    p = (cand[..., 5:].sigmoid() * cand[..., 4:5].sigmoid()).sqrt_()
    log_1mp = torch.log1p(-p).clamp_(min=-100)  # [B, M, C]
    gt_cls = labels[..., 0].long().clamp(0, num_classes - 1)  # [B, G]
    p_gt = p.transpose(1, 2).gather(1, gt_cls.unsqueeze(-1).expand(B, G, m))  # [B, G, M]
    cls_cost = (
        -log_1mp.sum(-1).unsqueeze(1)
        - torch.log(p_gt).clamp_(min=-100)
        + torch.log1p(-p_gt).clamp_(min=-100)
    )

    cost = cls_cost - 3.0 * torch.log(ious + 1e-8)
    cost = cost + OUTSIDE_COST * (~geometry).float()
    cost.masked_fill_(~pair_valid, float("inf"))

    # dynamic k per gt; padded candidates have IoU 0, so they do not change the top-k sum.
    k = min(CANDIDATE_TOPK, m)
    dynamic_k = ious.topk(k, dim=2).values.sum(-1).int().clamp_(min=1)  # [B, G]
    pos_cost, pos = cost.topk(k, dim=2, largest=False)
    take = (torch.arange(k, device=dev) < dynamic_k.unsqueeze(-1)) & torch.isfinite(pos_cost)
    matching = torch.zeros_like(cost, dtype=torch.bool).scatter_(2, pos, take)

    n_match = matching.sum(1)  # [B, M]
    fb, fm = (n_match > 0).nonzero(as_tuple=True)
    # gt row of each positive: index of its (single) True; fixed below for multi-claimed ones.
    gt_rows = torch.arange(G, device=dev, dtype=torch.int32).view(1, G, 1)
    g_idx = (matching * gt_rows).sum(1)[fb, fm].long()
    # An anchor claimed by several gts goes to the gt with the lowest cost (over all gts).
    multi = n_match[fb, fm] > 1
    if bool(multi.any()):
        mb, mm = fb[multi], fm[multi]
        g_idx[multi] = cost[mb, :, mm].argmin(1)
    return Assignment(fb, cand_idx[fb, fm], labels[fb, g_idx], ious[fb, g_idx, fm])


# SimOTA is data-dependent (per-image target counts, dynamic top-k): under torch.compile it
# graph-breaks and recompiles for new shapes. Kept eager, so ``torch.compile(model)`` compiles
# the network (backbone + head, forward and backward) and the loss runs as plain PyTorch.
@torch.compiler.disable
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

        asg = simota_assign(raw, labels, input_hw, strides, center_radius)
        bi, ai = asg.batch_idx, asg.anchor_idx
        norm = float(max(asg.num_fg, 1))
        fg_raw = raw[bi, ai]  # [F, 5 + C] rows of the positives (differentiable)

        obj_logits = raw[..., 4]
        obj_target = torch.zeros_like(obj_logits)
        obj_target[bi, ai] = 1.0
        loss_obj = (
            F.binary_cross_entropy_with_logits(obj_logits, obj_target, reduction="sum") / norm
        )
        fg_boxes = decode_boxes(fg_raw[:, :4], grid[ai], stride[ai])
        loss_iou = IOU_WEIGHT * iou_loss(fg_boxes, asg.gt[:, 1:5]).sum() / norm
        cls_target = F.one_hot(asg.gt[:, 0].long(), num_classes).float() * asg.iou.unsqueeze(-1)
        loss_cls = (
            F.binary_cross_entropy_with_logits(fg_raw[:, 5:], cls_target, reduction="sum") / norm
        )
        if use_l1:
            s = stride[ai]
            l1_target = torch.cat(
                (asg.gt[:, 1:3] / s - grid[ai], torch.log(asg.gt[:, 3:5] / s + 1e-8)), dim=-1
            )
            loss_l1 = (fg_raw[:, :4] - l1_target).abs().sum() / norm
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
