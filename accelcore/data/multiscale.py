"""YOLOX multiscale training: a new input size every ``multiscale_interval`` iterations.

YOLOX draws the size on rank 0 and broadcasts it. Here the size is a pure function of
(seed, iteration), so every rank computes the same value without communication, and a resumed
run picks up the same schedule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def multiscale_size(
    iteration: int,
    input_size: Sequence[int],
    multiscale_range: int = 5,
    multiscale_interval: int = 10,
    seed: int = 0,
) -> tuple[int, int]:
    """Input (H, W) for global ``iteration``: multiples of 32 in ``H ± multiscale_range*32``
    (W follows H's aspect ratio, as in YOLOX ``random_resize``). The first interval uses
    ``input_size`` itself; ``multiscale_range <= 0`` disables resizing.
    """
    base_h, base_w = int(input_size[0]), int(input_size[1])
    interval = max(1, int(multiscale_interval))
    block = int(iteration) // interval
    if multiscale_range <= 0 or block == 0:
        return base_h, base_w
    lo = max(1, base_h // 32 - int(multiscale_range))
    hi = base_h // 32 + int(multiscale_range)
    k = int(np.random.default_rng([int(seed) & 0xFFFFFFFF, block, 0x5CA1E]).integers(lo, hi + 1))
    aspect = base_w / base_h
    return 32 * k, 32 * max(1, int(k * aspect))


def resize_batch(
    images: torch.Tensor, targets: torch.Tensor | None, size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bilinearly resize ``images [B,3,H,W]`` to ``size`` (H, W) and scale ``targets``
    ``[B, N, 5] = (cls, cx, cy, w, h)`` to match (padding rows stay zero). Returns new tensors.
    """
    h, w = images.shape[-2:]
    new_h, new_w = int(size[0]), int(size[1])
    if (new_h, new_w) == (h, w):
        return images, targets
    images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    if targets is not None:
        targets = targets.clone()
        targets[..., 1::2] *= new_w / w  # cx, w
        targets[..., 2::2] *= new_h / h  # cy, h
    return images, targets
