"""The YOLOX detector: ``backbone`` (YOLOPAFPN) + ``head`` (YOLOXHead), as official."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..loss import yolox_loss
from ..postprocess import decode_outputs, postprocess, postprocess_raw
from .head import YOLOXHead
from .pafpn import YOLOPAFPN

OUTPUT_MODES = ("decoded", "raw")


class YOLOX(nn.Module):
    """YOLOX detector; implements :class:`accelcore.interfaces.Detector`.

    * train: ``model(images, targets)`` -> loss dict (``loss_keys``: ``total_loss``,
      ``iou_loss``, ``l1_loss``, ``conf_loss``, ``cls_loss``, ``num_fg``), computed in fp32 even
      under autocast; the L1 part is 0 until ``start_no_augmentation()`` (official behaviour).
    * eval, ``output_mode == "decoded"`` (default): official decoded output [B, N, 5 + C].
    * eval, ``output_mode == "raw"``: undecoded logits [B, N, 5 + C]; the graph is plain
      convs + reshapes, so it traces / exports / quantizes cleanly. ``decode(raw, input_hw)``
      turns it into exactly the decoded output.
    """

    loss_keys: tuple[str, ...] = ("total_loss", "iou_loss", "l1_loss", "conf_loss", "cls_loss",
                                  "num_fg")

    def __init__(
        self,
        backbone: YOLOPAFPN,
        head: YOLOXHead,
        meta: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.output_mode = "decoded"
        self.meta: dict[str, Any] = dict(meta or {})

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def strides(self) -> tuple[int, ...]:
        return self.head.strides

    @property
    def input_size(self) -> tuple[int, int]:
        """Default (H, W): the size the model was built for (zoo default or the recipe's)."""
        height, width = self.meta.get("input_size", (640, 640))
        return int(height), int(width)

    def start_no_augmentation(self) -> None:
        """The last no-augmentation epochs add the L1 loss on raw box regression (official)."""
        self.head.use_l1 = True

    def deploy_form(self) -> YOLOX:
        """An eval copy computing exactly the same function with graph-runtime-friendly ops:
        the Focus stem's strided slices + concat become one stride-2 convolution."""
        import copy

        from .blocks import Focus

        model = copy.deepcopy(self).eval()
        stem = getattr(model.backbone.backbone, "stem", None)
        if isinstance(stem, Focus):
            model.backbone.backbone.stem = stem.as_strided_conv()
        return model

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        raw = self.head(self.backbone(x))
        if self.training:
            if targets is None:
                raise ValueError("YOLOX in train mode needs targets: model(images, targets)")
            return yolox_loss(
                raw, targets, x.shape[-2:], self.head.strides, use_l1=self.head.use_l1
            )
        if self.output_mode == "raw":
            return raw
        if self.output_mode != "decoded":
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {self.output_mode!r}")
        return self.decode(raw, x.shape[-2:])

    def decode(self, raw: torch.Tensor, input_hw: tuple[int, int] | torch.Size) -> torch.Tensor:
        """Raw output -> decoded (cx, cy, w, h, obj, cls…) in fp32."""
        return decode_outputs(raw, input_hw, self.head.strides)

    def postprocess(
        self,
        decoded: torch.Tensor,
        conf_thre: float = 0.001,
        nms_thre: float = 0.65,
        class_agnostic: bool = False,
        max_det: int = 300,
    ) -> list[np.ndarray]:
        """Score filter + NMS -> per image (K, 6) float32 [x1, y1, x2, y2, score, class]."""
        return postprocess(
            decoded,
            conf_thre=conf_thre,
            nms_thre=nms_thre,
            class_agnostic=class_agnostic,
            max_det=max_det,
        )

    def postprocess_raw(
        self,
        raw: torch.Tensor,
        input_hw: tuple[int, int] | torch.Size,
        conf_thre: float = 0.001,
        nms_thre: float = 0.65,
        class_agnostic: bool = False,
        max_det: int = 300,
    ) -> list[np.ndarray]:
        """``postprocess(decode(raw, input_hw), …)``, decoding only the anchors that can pass
        ``conf_thre``."""
        return postprocess_raw(
            raw,
            input_hw,
            self.head.strides,
            conf_thre=conf_thre,
            nms_thre=nms_thre,
            class_agnostic=class_agnostic,
            max_det=max_det,
        )
