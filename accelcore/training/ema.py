"""Exponential moving average of the weights (YOLOX's ModelEMA semantics).

decay(u) = d · (1 − exp(−u / 2000)) ramps up so early, fast-changing weights are not frozen in.
Every floating-point tensor of the state dict (parameters *and* BN running stats) is averaged;
integer buffers (``num_batches_tracked``) are left alone, as in the official code.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.9998, updates: int = 0,
                 ramp: float = 2000.0) -> None:
        self.ema = copy.deepcopy(unwrap(model)).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.base_decay = float(decay)
        self.ramp = float(ramp)
        self.updates = int(updates)
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._source: nn.Module | None = None

    def decay(self, updates: int) -> float:
        return self.base_decay * (1.0 - math.exp(-updates / self.ramp))

    def _bind(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # The state-dict tensors share storage with the live parameters/buffers, so the pairing
        # is computed once; in-place optimizer steps and load_state_dict keep it valid.
        src = unwrap(model)
        if self._pairs is None or self._source is not src:
            msd = src.state_dict(keep_vars=False)
            ema_list, model_list = [], []
            for k, v in self.ema.state_dict(keep_vars=False).items():
                if v.dtype.is_floating_point:
                    ema_list.append(v)
                    model_list.append(msd[k].detach())
            self._pairs, self._source = (ema_list, model_list), src
        return self._pairs

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay(self.updates)
        ema_list, model_list = self._bind(model)
        # ema = d·ema + (1−d)·model, fused over all tensors (one kernel launch per chunk).
        torch._foreach_lerp_(ema_list, model_list, 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.ema.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["model"])
        self.updates = int(state["updates"])
