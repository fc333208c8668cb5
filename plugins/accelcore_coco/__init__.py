"""Data plugin: COCO-format folders and the built-in synthetic shapes set.

This plugin owns the recipe's ``data`` section and decides from it which source to read:
``data.root`` set → that COCO-format folder; unset → the synthetic set (``data.synthetic``),
generated once into its cache. ``accelcore_build_data`` returns the plain
:class:`~accelcore.data.coco.COCODataset` for a split; augmentation wrapping is the training
engine's job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelcore import hookimpl
from accelcore.interfaces import Declaration

DEFAULT_SYNTHETIC_CACHE = Path("~/.cache/accelcore/synthetic")
_SPLITS = ("train", "val")


@hookimpl
def accelcore_declare() -> list[Declaration]:
    return [
        Declaration(
            kind="data",
            name="coco",
            summary="COCO-format folder: <root>/<split dir>/, <root>/annotations/<json>",
        ),
        Declaration(
            kind="data",
            name="synthetic",
            summary="generated coloured-shapes set in COCO format (offline default)",
        ),
    ]


def _opt(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        value = obj.get(name, default)
    else:
        value = getattr(obj, name, default)
    return default if value is None else value


def synthetic_folder(config: Any) -> Path:
    """Generate (or reuse) the synthetic dataset described by ``config.synthetic``."""
    from accelcore.data.synthetic import ensure_synthetic

    syn = _opt(config, "synthetic", {})
    cache_dir = _opt(syn, "cache_dir", DEFAULT_SYNTHETIC_CACHE)
    return ensure_synthetic(
        Path(cache_dir).expanduser(),
        images=int(_opt(syn, "images", 512)),
        val_images=int(_opt(syn, "val_images", 64)),
        size=int(_opt(syn, "size", 416)),
        seed=int(_opt(syn, "seed", 0)),
        num_classes=int(_opt(syn, "num_classes", 8)),
    )


@hookimpl
def accelcore_build_data(config: Any, split: str, run_dir: Path) -> Any:
    from accelcore.data.coco import COCODataset
    from accelcore.errors import DataError

    if split not in _SPLITS:
        raise DataError(f"unknown data split '{split}' (expected one of {', '.join(_SPLITS)})")
    root = _opt(config, "root", None)
    if root is None:
        root = synthetic_folder(config)
        image_dir, json_file = f"{split}2017", f"instances_{split}2017.json"
    else:
        default_dir = "train2017" if split == "train" else "val2017"
        image_dir = str(_opt(config, split, default_dir))
        json_file = str(_opt(config, f"{split}_json", f"instances_{default_dir}.json"))
    return COCODataset(root, image_dir, json_file, cache=_opt(config, "cache", "auto"))


@hookimpl
def accelcore_validate(predictor: Any, dataset: Any, options: Any, input_size: tuple[int, int],
                       out_dir: Path | None) -> dict | None:
    """COCO AP (pycocotools) of ``predictor`` on a COCO-format dataset."""
    if not hasattr(dataset, "coco"):
        return None
    from accelcore.evaluation import evaluate_predictor

    return evaluate_predictor(
        predictor, dataset, input_size, batch_size=_opt(options, "batch_size", 16),
        out_dir=out_dir, progress=True, max_images=_opt(options, "max_images"))
