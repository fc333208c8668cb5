"""CSPDarknet backbone of YOLOX (Focus stem, four CSP stages, SPP in the last stage)."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import CSPLayer, Focus, SPPBottleneck, conv_type


class CSPDarknet(nn.Module):
    """Returns the stride-8/16/32 feature maps (``dark3``, ``dark4``, ``dark5``) as a dict."""

    def __init__(
        self,
        dep_mul: float,
        wid_mul: float,
        out_features: tuple[str, ...] = ("dark3", "dark4", "dark5"),
        depthwise: bool = False,
        act: str = "silu",
    ) -> None:
        super().__init__()
        self.out_features = out_features
        conv = conv_type(depthwise)
        ch = int(wid_mul * 64)
        depth = max(round(dep_mul * 3), 1)

        # The stem stays a plain 3x3 conv even for depthwise models (as official).
        self.stem = Focus(3, ch, ksize=3, act=act)
        self.dark2 = nn.Sequential(
            conv(ch, ch * 2, 3, 2, act=act),
            CSPLayer(ch * 2, ch * 2, n=depth, depthwise=depthwise, act=act),
        )
        self.dark3 = nn.Sequential(
            conv(ch * 2, ch * 4, 3, 2, act=act),
            CSPLayer(ch * 4, ch * 4, n=depth * 3, depthwise=depthwise, act=act),
        )
        self.dark4 = nn.Sequential(
            conv(ch * 4, ch * 8, 3, 2, act=act),
            CSPLayer(ch * 8, ch * 8, n=depth * 3, depthwise=depthwise, act=act),
        )
        self.dark5 = nn.Sequential(
            conv(ch * 8, ch * 16, 3, 2, act=act),
            SPPBottleneck(ch * 16, ch * 16, activation=act),
            CSPLayer(ch * 16, ch * 16, n=depth, shortcut=False, depthwise=depthwise, act=act),
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        outputs["stem"] = x
        for name in ("dark2", "dark3", "dark4", "dark5"):
            x = getattr(self, name)(x)
            outputs[name] = x
        return {k: v for k, v in outputs.items() if k in self.out_features}
