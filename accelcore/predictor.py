"""One detection path for every method: forward → fp32 decode → NMS.

Eager models, accelerated artifacts and the training-time evaluator all go through
:class:`Predictor`, so every method is measured with the same post-processing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from accelcore.interfaces import Detector


class Predictor:
    """Turn a batch of letterboxed images into per-image detections.

    ``forward`` maps letterboxed BGR 0-255 images (float32 NCHW or uint8 NHWC) to either the
    model's raw output (``raw=True``: the model's ``decode`` runs here in fp32) or already-decoded
    output. ``model`` is the :class:`~accelcore.interfaces.Detector` that supplies ``decode`` and
    ``postprocess`` (its weights are not used here).
    """

    def __init__(self, forward: Callable[[torch.Tensor], Any], model: Detector, *,
                 raw: bool = True, conf_thre: float = 0.001, nms_thre: float = 0.65) -> None:
        self.forward = forward
        self.model = model
        self.raw = raw
        self.conf_thre = conf_thre
        self.nms_thre = nms_thre

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> list[np.ndarray]:
        from accelcore.inference.image_format import UINT8_NHWC, format_of

        nhwc = format_of(images) == UINT8_NHWC
        input_hw = tuple(images.shape[1:3] if nhwc else images.shape[-2:])
        return self.detections(self.forward(images), input_hw)

    @torch.inference_mode()
    def detections(self, out: Any, input_hw: tuple[int, int]) -> list[np.ndarray]:
        """Decode (``raw=True``) + NMS of a forward's output for images of ``input_hw`` (H, W):
        the post-processing half of ``__call__``, for callers that run the forward elsewhere
        (the streaming predictor runs it on its own thread)."""
        if isinstance(out, (list, tuple)):
            out = out[0]
        out = torch.as_tensor(out).float()
        if self.raw:
            fused = getattr(self.model, "postprocess_raw", None)
            if fused is not None:  # optional Detector member: decode only what can pass
                return fused(out, tuple(input_hw), self.conf_thre, self.nms_thre)
            out = self.model.decode(out, tuple(input_hw))
        return self.model.postprocess(out, self.conf_thre, self.nms_thre)
