"""Building blocks of YOLOX (conv-BN-act, depthwise conv, CSP layer, SPP, Focus stem).

Attribute names (``conv``, ``bn``, ``dconv``, ``pconv``, ``conv1``…, ``m``) follow the official
YOLOX implementation so that its checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from accelcore.training import conv_forms, lean_step
from accelcore.training.bn_silu import bn_silu
from accelcore.training.layout import channel_cat
from accelcore.training.space_to_depth import space_to_depth, stacked_slices

# Official YOLOX overrides BatchNorm defaults for every model size (``init_yolo`` in its Exp).
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def make_activation(name: str = "silu") -> nn.Module:
    """Activation by name.

    Not in-place (official uses ``inplace=True``): in-place ops complicate torch.export /
    quantization graph rewriting, and the memory saving is small on CPU.
    """
    if name == "silu":
        return nn.SiLU()
    if name == "relu":
        return nn.ReLU()
    if name == "lrelu":
        return nn.LeakyReLU(0.1)
    raise ValueError(f"unsupported activation '{name}' (use silu, relu or lrelu)")


class BaseConv(nn.Module):
    """Conv2d (no bias, 'same' padding) -> BatchNorm2d -> activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ksize: int,
        stride: int,
        groups: int = 1,
        bias: bool = False,
        act: str = "silu",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size=ksize,
            stride=stride,
            padding=(ksize - 1) // 2,
            groups=groups,
            bias=bias,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and isinstance(self.act, nn.SiLU):
            # Training on CPU channels_last: one fused BN + SiLU kernel (exactly silu(bn(.))
            # elsewhere); BN + SiLU were as slow as all convolutions together in eager. A
            # convolution takes its fastest exact form on this CPU (conv_forms).
            return bn_silu(conv_forms.conv2d(self.conv, x), self.bn)
        return self.act(self.bn(self.conv(x)))


class DWConv(nn.Module):
    """Depthwise kxk BaseConv followed by a pointwise 1x1 BaseConv (used by YOLOX-Nano)."""

    def __init__(
        self, in_channels: int, out_channels: int, ksize: int, stride: int = 1, act: str = "silu"
    ) -> None:
        super().__init__()
        self.dconv = BaseConv(
            in_channels, in_channels, ksize=ksize, stride=stride, groups=in_channels, act=act
        )
        self.pconv = BaseConv(in_channels, out_channels, ksize=1, stride=1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pconv(self.dconv(x))


def conv_type(depthwise: bool) -> type[nn.Module]:
    """The 3x3 conv flavour used by a model: depthwise-separable or plain."""
    return DWConv if depthwise else BaseConv


class Bottleneck(nn.Module):
    """1x1 reduce then 3x3 conv, with a residual add when shapes allow it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        shortcut: bool = True,
        expansion: float = 0.5,
        depthwise: bool = False,
        act: str = "silu",
    ) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = BaseConv(in_channels, hidden, 1, stride=1, act=act)
        self.conv2 = conv_type(depthwise)(hidden, out_channels, 3, stride=1, act=act)
        self.use_add = shortcut and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return y + x if self.use_add else y


class SPPBottleneck(nn.Module):
    """Spatial pyramid pooling (max-pools 5/9/13, stride 1) between two 1x1 convs."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_sizes: tuple[int, ...] = (5, 9, 13),
        activation: str = "silu",
    ) -> None:
        super().__init__()
        hidden = in_channels // 2
        self.conv1 = BaseConv(in_channels, hidden, 1, stride=1, act=activation)
        self.m = nn.ModuleList(
            nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2) for k in kernel_sizes
        )
        self.conv2 = BaseConv(hidden * (len(kernel_sizes) + 1), out_channels, 1, 1, act=activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.training and lean_step.enabled() and chainable(self.m):
            return self.conv2(channel_cat([x, *chained_max_pools(x, self.m)]))
        return self.conv2(torch.cat([x, *(pool(x) for pool in self.m)], dim=1))


def chainable(pools: nn.ModuleList) -> bool:
    """Whether :func:`chained_max_pools` computes these pools: stride-1 'same' max pools of
    growing odd sizes."""
    sizes = []
    for pool in pools:
        k = pool.kernel_size
        if not (isinstance(pool, nn.MaxPool2d) and isinstance(k, int) and k % 2 == 1
                and pool.stride in (1, (1, 1)) and pool.padding in (k // 2, (k // 2,) * 2)
                and pool.dilation in (1, (1, 1)) and not pool.ceil_mode
                and not pool.return_indices):
            return False
        sizes.append(k)
    return sizes == sorted(set(sizes))


def chained_max_pools(x: torch.Tensor, pools: nn.ModuleList) -> list[torch.Tensor]:
    """The outputs of stride-1 max pools of growing odd sizes, each from the previous one.

    A k-window max of an m-window max is the (k + m - 1)-window max (padding is -inf either
    way), so 5, 9 and 13 are three 5x5 pools, 75 window elements per pixel instead of 275:
    SPP's pools took 30 ms of a bf16 training step (batch 64, 416 px, 2-core Zen 4). The values
    are the same; with ties the gradient may go to another maximum than the direct pool's.
    """
    outputs, size, prev = [], 1, x
    for pool in pools:
        k = pool.kernel_size
        step = k - size + 1
        prev = F.max_pool2d(prev, step, 1, step // 2)
        outputs.append(prev)
        size = k
    return outputs


class CSPLayer(nn.Module):
    """CSP block (YOLOv5 C3): two 1x1 branches, n bottlenecks on one, concat, 1x1 fuse."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n: int = 1,
        shortcut: bool = True,
        expansion: float = 0.5,
        depthwise: bool = False,
        act: str = "silu",
    ) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        self.conv1 = BaseConv(in_channels, hidden, 1, stride=1, act=act)
        self.conv2 = BaseConv(in_channels, hidden, 1, stride=1, act=act)
        self.conv3 = BaseConv(2 * hidden, out_channels, 1, stride=1, act=act)
        self.m = nn.Sequential(
            *(Bottleneck(hidden, hidden, shortcut, 1.0, depthwise, act=act) for _ in range(n))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # gradients of the concat as contiguous pieces (training.layout)
            return self.conv3(channel_cat((self.m(self.conv1(x)), self.conv2(x))))
        return self.conv3(torch.cat((self.m(self.conv1(x)), self.conv2(x)), dim=1))


class Focus(nn.Module):
    """Space-to-depth stem: 2x2 pixel blocks become 4x channels, then one BaseConv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        ksize: int = 1,
        stride: int = 1,
        act: str = "silu",
    ) -> None:
        super().__init__()
        self.conv = BaseConv(in_channels * 4, out_channels, ksize, stride, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            # The same blocks in one pass (and already in the autocast dtype): the slices and
            # concat (stacked_slices) cost more than the stem convolution itself on a
            # channels_last batch.
            return self.conv(space_to_depth(x))
        # Channel order (top-left, bottom-left, top-right, bottom-right) must match the official
        # one, otherwise pretrained stem weights see permuted inputs. Inference keeps the plain
        # ops, which every exporter traces.
        return self.conv(stacked_slices(x))

    def as_strided_conv(self) -> BaseConv:
        """The exact same function as one ``2k×2k`` stride-2 convolution on the image.

        Output pixel (i, j) of the k×k conv over the space-to-depth grid reads grid cells
        i-(k//2)..i+(k//2), i.e. image rows 2i-2(k//2) .. 2i+2(k//2)+1: a 2k×2k window at
        stride 2 with padding 2(k//2). Each grid channel block (dy, dx) becomes the kernel taps
        of that parity. Graph runtimes run the strided slices and the concat of the original
        with slow generic kernels (OpenVINO: ~17% of a batch); one convolution is fast there.
        """
        conv = self.conv.conv
        k = conv.kernel_size[0]
        in_ch = conv.in_channels // 4
        fused = BaseConv(in_ch, conv.out_channels, 2 * k, 2)
        fused.conv.padding = (2 * (k // 2), 2 * (k // 2))
        weight = torch.zeros(conv.out_channels, in_ch, 2 * k, 2 * k)
        for block, (dy, dx) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
            weight[:, :, dy::2, dx::2] = conv.weight.detach()[:, block * in_ch:(block + 1) * in_ch]
        fused.conv.weight = nn.Parameter(weight, requires_grad=False)
        fused.bn = self.conv.bn
        fused.act = self.conv.act
        return fused
