"""float64: weights, buffers and inputs in double (a numerical reference; slow)."""

from __future__ import annotations

from typing import Any

import torch

from accelcore.interfaces import Precision


class DoublePrecision(Precision):
    name = "64"

    def convert_module(self, module: Any) -> Any:
        return module.to(torch.float64)

    def convert_input(self, tensor: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            return tensor.to(torch.float64)
        return tensor
