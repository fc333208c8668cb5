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

    ``forward`` maps float32 NCHW BGR 0-255 images to either the model's raw output
    (``raw=True``: the model's ``decode`` runs here in fp32) or already-decoded output. ``model``
    is the :class:`~accelcore.interfaces.Detector` that supplies ``decode`` and ``postprocess``
    (its weights are not used here).
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
        out = self.forward(images)
        if isinstance(out, (list, tuple)):
            out = out[0]
        out = torch.as_tensor(out).float()
        if self.raw:
            out = self.model.decode(out, tuple(images.shape[-2:]))
        return self.model.postprocess(out, self.conf_thre, self.nms_thre)
