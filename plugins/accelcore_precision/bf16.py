"""bf16 mixed precision: fp32 master weights, CPU autocast to bfloat16 for forward.

bf16 has fp32's exponent range, so no loss scaling is needed. The loss itself runs in fp32
(the model's loss disables autocast).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from accelcore.interfaces import Precision


class BF16MixedPrecision(Precision):
    name = "bf16"

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            yield
