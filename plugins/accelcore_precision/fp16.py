"""fp16 mixed precision on CPU: autocast to float16 plus dynamic loss scaling.

fp16's narrow exponent range underflows small gradients, hence ``torch.amp.GradScaler("cpu")``;
the scaler's state (scale, growth tracker) is saved in checkpoints so a resume continues with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from accelcore.interfaces import Precision


class HalfMixedPrecision(Precision):
    name = "16"

    def __init__(self, init_scale: float = 2.0**16) -> None:
        self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        with torch.autocast(device_type="cpu", dtype=torch.float16):
            yield

    def backward(self, loss: Any) -> None:
        self.scaler.scale(loss).backward()

    def optimizer_step(self, optimizer: Any) -> None:
        # step() skips the update when grads overflowed; update() then lowers the scale.
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.scaler.load_state_dict(state)
