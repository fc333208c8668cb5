"""YOLOX network modules, named like the official implementation."""

from .blocks import BaseConv, Bottleneck, CSPLayer, DWConv, Focus, SPPBottleneck
from .darknet import CSPDarknet
from .head import YOLOXHead
from .pafpn import YOLOPAFPN
from .yolox import YOLOX

__all__ = [
    "YOLOX",
    "BaseConv",
    "Bottleneck",
    "CSPDarknet",
    "CSPLayer",
    "DWConv",
    "Focus",
    "SPPBottleneck",
    "YOLOPAFPN",
    "YOLOXHead",
]
