"""The two image layouts a forward can take, and the lossless conversion between them.

``float32_nchw``: ``[B, 3, H, W]`` float32, BGR 0-255 — what the eager model takes.
``uint8_nhwc``: ``[B, H, W, 3]`` uint8, BGR — what the image decoder and the letterbox produce;
a quarter of the bytes, and no conversion pass when the runtime does it inside its graph.
Letterboxed pixels are integers 0-255 (the padding is 114), so either way is exact.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

FLOAT_NCHW = "float32_nchw"
UINT8_NHWC = "uint8_nhwc"
IMAGE_FORMATS = (FLOAT_NCHW, UINT8_NHWC)


def format_of(images: Any) -> str:
    """Which layout ``images`` (torch tensor or numpy array, 4-D) is in."""
    dtype = images.dtype
    is_uint8 = dtype == torch.uint8 if isinstance(images, torch.Tensor) else dtype == np.uint8
    if is_uint8 and images.ndim == 4 and images.shape[-1] == 3:
        return UINT8_NHWC
    return FLOAT_NCHW


def to_format(images: Any, fmt: str) -> Any:
    """``images`` in layout ``fmt`` (a torch tensor; returned unchanged if already there)."""
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; known: {', '.join(IMAGE_FORMATS)}")
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if format_of(images) == fmt:
        return images
    if fmt == UINT8_NHWC:
        return images.round().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return images.permute(0, 3, 1, 2).float().contiguous()
