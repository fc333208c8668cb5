"""Per-iteration learning-rate schedules with the formulas of official YOLOX.

The schedule is always computed for the full run (``epochs × iters_per_epoch``); ``max_iters``
only stops the loop early, so a smoke test sees the same lr curve as the real run.
"""

from __future__ import annotations

import math

#: quadwarm_cos_flat: quadratic warmup, cosine to min_lr, min_lr for the no-augmentation tail
#: (YOLOX's own schedule); warmcos: linear warmup, cosine to zero; constant.
SCHEDULERS = ("quadwarm_cos_flat", "warmcos", "constant")


class LRScheduler:
    """``lr_at(it)`` is the learning rate used for global iteration ``it`` (0-based)."""

    def __init__(self, name: str, lr: float, iters_per_epoch: int, total_epochs: int, *,
                 warmup_epochs: float = 5, warmup_lr_start: float = 0.0,
                 no_aug_epochs: int = 15, min_lr_ratio: float = 0.05) -> None:
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")
        self.name = name
        self.lr = float(lr)
        self.iters_per_epoch = int(iters_per_epoch)
        self.total_iters = self.iters_per_epoch * int(total_epochs)
        self.warmup_iters = int(round(self.iters_per_epoch * warmup_epochs))
        self.warmup_lr_start = float(warmup_lr_start)
        self.no_aug_iters = self.iters_per_epoch * int(no_aug_epochs)
        self.min_lr = self.lr * float(min_lr_ratio)

    def lr_at(self, it: int) -> float:
        if self.name == "constant":
            return self.lr
        if self.name == "warmcos":
            return self._warmcos(it)
        return self._quadwarm_cos_flat(it)

    def _quadwarm_cos_flat(self, it: int) -> float:
        # Quadratic warmup, cosine from lr to min_lr, then min_lr constant for the no-aug tail.
        if self.warmup_iters > 0 and it <= self.warmup_iters:
            frac = it / float(self.warmup_iters)
            return (self.lr - self.warmup_lr_start) * frac * frac + self.warmup_lr_start
        if it >= self.total_iters - self.no_aug_iters:
            return self.min_lr
        span = max(1, self.total_iters - self.warmup_iters - self.no_aug_iters)
        cos = math.cos(math.pi * (it - self.warmup_iters) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + cos)

    def _warmcos(self, it: int) -> float:
        # Linear warmup then cosine to zero (YOLOX's plain "warmcos").
        if self.warmup_iters > 0 and it <= self.warmup_iters:
            return (self.lr - self.warmup_lr_start) * it / float(self.warmup_iters) \
                + self.warmup_lr_start
        span = max(1, self.total_iters - self.warmup_iters)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * (it - self.warmup_iters) / span))
