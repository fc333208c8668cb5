"""YOLOX's optimizer: SGD (momentum, Nesterov) over three parameter groups.

group 0: normalisation-layer weights (no decay); group 1: conv/linear weights (decay);
group 2: biases (no decay). Same split as official ``get_optimizer``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter],
                                            list[nn.Parameter]]:
    """(norm weights, decayed weights, biases); every trainable parameter lands in exactly one."""
    no_decay, decay, biases = [], [], []
    seen: set[int] = set()
    for name, module in model.named_modules():
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter) and bias.requires_grad and id(bias) not in seen:
            biases.append(bias)
            seen.add(id(bias))
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or not weight.requires_grad or id(weight) in seen:
            continue
        seen.add(id(weight))
        # official also treats any module whose name contains "bn" as a norm layer
        if isinstance(module, _NORMS) or "bn" in name.rsplit(".", 1)[-1]:
            no_decay.append(weight)
        else:
            decay.append(weight)
    # Parameters not held as .weight/.bias (rare: custom modules): decay matrices only.
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            (decay if p.ndim > 1 else no_decay).append(p)
            seen.add(id(p))
    return no_decay, decay, biases


def build_optimizer(model: nn.Module, cfg: Any, lr: float) -> torch.optim.SGD:
    """SGD from a ``TrainConfig`` (momentum, nesterov, weight_decay); ``lr`` is the start lr."""
    no_decay, decay, biases = param_groups(model)
    # foreach=True: one fused multi-tensor update instead of ~300 small per-parameter kernels.
    opt = torch.optim.SGD(no_decay, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=0.0, foreach=True)
    opt.add_param_group({"params": decay, "weight_decay": cfg.weight_decay})
    opt.add_param_group({"params": biases, "weight_decay": 0.0})
    return opt


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
