"""YOLOPAFPN: CSPDarknet plus a top-down / bottom-up path aggregation neck."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from accelcore.training.layout import channel_cat

from .blocks import BaseConv, CSPLayer, conv_type
from .darknet import CSPDarknet


class YOLOPAFPN(nn.Module):
    """Backbone + PAN neck; returns (P3, P4, P5) at strides 8, 16, 32."""

    def __init__(
        self,
        depth: float = 1.0,
        width: float = 1.0,
        in_features: tuple[str, ...] = ("dark3", "dark4", "dark5"),
        in_channels: tuple[int, int, int] = (256, 512, 1024),
        depthwise: bool = False,
        act: str = "silu",
    ) -> None:
        super().__init__()
        self.backbone = CSPDarknet(depth, width, depthwise=depthwise, act=act)
        self.in_features = in_features
        self.in_channels = tuple(in_channels)
        conv = conv_type(depthwise)
        c3, c4, c5 = (int(c * width) for c in in_channels)
        n = round(3 * depth)

        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        # top-down path
        self.lateral_conv0 = BaseConv(c5, c4, 1, 1, act=act)
        self.C3_p4 = CSPLayer(2 * c4, c4, n, False, depthwise=depthwise, act=act)
        self.reduce_conv1 = BaseConv(c4, c3, 1, 1, act=act)
        self.C3_p3 = CSPLayer(2 * c3, c3, n, False, depthwise=depthwise, act=act)
        # bottom-up path
        self.bu_conv2 = conv(c3, c3, 3, 2, act=act)
        self.C3_n3 = CSPLayer(2 * c3, c4, n, False, depthwise=depthwise, act=act)
        self.bu_conv1 = conv(c4, c4, 3, 2, act=act)
        self.C3_n4 = CSPLayer(2 * c4, c5, n, False, depthwise=depthwise, act=act)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)
        x2, x1, x0 = (feats[f] for f in self.in_features)

        # Training: the concats' gradients as contiguous pieces (training.layout).
        cat = channel_cat if self.training else partial(torch.cat, dim=1)
        fpn_out0 = self.lateral_conv0(x0)
        f_out0 = self.C3_p4(cat([self.upsample(fpn_out0), x1]))
        fpn_out1 = self.reduce_conv1(f_out0)
        pan_out2 = self.C3_p3(cat([self.upsample(fpn_out1), x2]))

        pan_out1 = self.C3_n3(cat([self.bu_conv2(pan_out2), fpn_out1]))
        pan_out0 = self.C3_n4(cat([self.bu_conv1(pan_out1), fpn_out0]))
        return pan_out2, pan_out1, pan_out0
