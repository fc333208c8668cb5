"""Load official YOLOX ``.pth`` files and accelcore checkpoints into a YOLOX model.

Accepted layouts (always read with ``torch.load(weights_only=True)``):
* official: ``{"model": state_dict, "optimizer": …, "start_epoch": …}`` (EMA weights under "model");
* bare ``state_dict``;
* accelcore: ``{"model": state_dict, "ema": state_dict | {"module": state_dict, …}, …}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from accelcore.errors import CheckpointError, one_line

log = logging.getLogger(__name__)

CLS_PRED_PREFIX = "head.cls_preds."
_CLS_WEIGHT = "head.cls_preds.0.weight"


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _strip_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel / DDP / ModelEmaV2 wrappers save keys as "module.xxx".
    if all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def extract_state_dict(obj: Any, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """Find the weights in a loaded checkpoint; returns (state_dict, which entry it came from)."""
    if _is_state_dict(obj):
        return _strip_prefix(obj), "state_dict"
    if isinstance(obj, Mapping):
        order = ("ema", "model", "state_dict") if use_ema else ("model", "state_dict", "ema")
        for key in order:
            entry = obj.get(key)
            if isinstance(entry, Mapping) and not _is_state_dict(entry):
                # e.g. {"ema": {"module": state_dict, "updates": n}}
                entry = next(
                    (
                        v
                        for v in (entry.get("module"), entry.get("state_dict"))
                        if _is_state_dict(v)
                    ),
                    None,
                )
            if _is_state_dict(entry):
                return _strip_prefix(entry), key
    raise ValueError("no state_dict found (expected a state_dict or a dict with 'model'/'ema')")


def checkpoint_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    w = state_dict.get(_CLS_WEIGHT)
    return int(w.shape[0]) if w is not None else None


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    finetune: bool = False,
    use_ema: bool = True,
) -> dict[str, Any]:
    """Load weights from ``path`` into ``model`` (strict, except as described below).

    * class-count mismatch: :class:`CheckpointError` unless ``finetune``; with ``finetune`` the
      ``head.cls_preds.*`` tensors are dropped (warning) and stay freshly initialised;
    * BatchNorm ``num_batches_tracked`` buffers missing from old checkpoints are tolerated
      (they are unused: momentum is fixed);
    * any other missing / unexpected / mis-shaped key: :class:`CheckpointError`.

    Returns ``{"path", "source", "dropped"}``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure becomes one clear line
        raise CheckpointError(f"cannot read checkpoint {path}: {one_line(e)}") from e
    try:
        state, source = extract_state_dict(obj, use_ema=use_ema)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from e

    own = model.state_dict()
    dropped: list[str] = []
    ckpt_classes = checkpoint_num_classes(state)
    model_classes = checkpoint_num_classes(own)
    if ckpt_classes is not None and model_classes is not None and ckpt_classes != model_classes:
        if not finetune:
            raise CheckpointError(
                f"checkpoint {path} has {ckpt_classes} classes but the model has "
                f"{model_classes}; set model.finetune=true to drop the class-prediction layers "
                f"(head.cls_preds.*) and load the rest"
            )
        dropped = sorted(
            k
            for k in state
            if k.startswith(CLS_PRED_PREFIX) and k in own and state[k].shape != own[k].shape
        )
        for k in dropped:
            del state[k]
        log.warning(
            "finetune: checkpoint %s has %d classes, model has %d; not loading %s",
            path,
            ckpt_classes,
            model_classes,
            ", ".join(dropped),
        )

    missing = [k for k in own if k not in state and k not in dropped]
    tolerated = [k for k in missing if k.endswith("num_batches_tracked")]
    missing = [k for k in missing if k not in tolerated]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} keys (e.g. {keys[0]})")
        if mismatched:
            k = mismatched[0]
            parts.append(
                f"{len(mismatched)} shape mismatches (e.g. {k}: checkpoint "
                f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
            )
        name = getattr(model, "meta", {}).get("name", type(model).__name__)
        raise CheckpointError(
            f"checkpoint {path} does not fit model {name}: {'; '.join(parts)} "
            f"- is it a checkpoint of another model size?"
        )
    for k in tolerated + dropped:
        state[k] = own[k]
    model.load_state_dict(state, strict=True)
    return {"path": str(path), "source": source, "dropped": dropped}
