"""``accelcore optimize``: accelerate a trained checkpoint with every method and report.

A shortcut for a recipe with ``stages: [accelerate, report]``: the model name, class count and
input size come from the checkpoint's ``meta`` (written by accelcore's training loop) and, for
what that does not tell (e.g. an official ``.pth`` of a model plugin), from the model plugin's
``accelcore_checkpoint_info`` hook; ``--set`` overrides any recipe key.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from accelcore.commands import add_plugin_option
from accelcore.errors import CheckpointError, RecipeError, one_line


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "optimize", help="accelerate a checkpoint with many methods, pick the fastest accurate one",
        description="Convert, time and evaluate a checkpoint with each acceleration method, "
                    "write report.md/json/png and save the selected artifact.")
    p.add_argument("--model", required=True, metavar="CKPT", help="checkpoint (.pth)")
    p.add_argument("--data", metavar="DIR",
                   help="COCO-format folder for calibration (train) and accuracy (val); "
                        "default: the built-in synthetic set")
    p.add_argument("--methods", help="comma-separated methods (default: every declared one; "
                                     "see `accelcore list-plugins`)")
    p.add_argument("--out", help="run folder (default: runs/optimize-<timestamp>/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set accelerate.batch_size=8")
    add_plugin_option(p)
    p.set_defaults(handler=handle)


def checkpoint_meta(path: str | Path, pm: Any) -> dict[str, Any]:
    """``name``, ``num_classes``, ``input_size`` as far as the checkpoint tells them."""
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"--model {path}: file not found") from None
    except Exception as exc:
        raise CheckpointError(f"--model {path}: cannot read checkpoint: "
                              f"{one_line(exc)}") from None
    keys = ("name", "num_classes", "input_size")
    # The plugin that recognises the weights first; the loop's own "meta" (it wrote it) wins.
    meta = {k: v for k, v in (pm.hook.accelcore_checkpoint_info(checkpoint=obj) or {}).items()
            if k in keys and v is not None}
    if isinstance(obj, dict) and isinstance(obj.get("meta"), dict):
        meta.update({k: obj["meta"][k] for k in keys if obj["meta"].get(k) is not None})
    return meta


def build_recipe(args: argparse.Namespace, all_methods: list[str], pm: Any) -> Any:
    from accelcore.config import load_recipe

    meta = checkpoint_meta(args.model, pm)
    model: dict[str, Any] = {"checkpoint": str(args.model)}
    if "name" in meta:
        model["name"] = meta["name"]
    if "num_classes" in meta:
        model["num_classes"] = int(meta["num_classes"])
    if "input_size" in meta:
        model["input_size"] = [int(v) for v in meta["input_size"]]
    methods = ([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods
               else all_methods)
    if not methods:
        raise RecipeError("--methods: no method given")
    data = {"name": "optimize", "stages": ["accelerate", "report"], "model": model,
            "accelerate": {"methods": methods}, "plugins": list(args.plugins)}
    if args.data is not None:
        data["data"] = {"root": str(args.data)}
    return load_recipe(data=data, overrides=list(args.overrides))


def handle(args: argparse.Namespace) -> int:
    from accelcore.pipeline import run_recipe
    from accelcore.plugins import get_plugin_manager

    pm = get_plugin_manager(args.plugins)
    available = [p.declaration.name for p in pm.declarations()
                 if p.declaration.kind == "backend" and p.declaration.available]
    recipe = build_recipe(args, sorted(set(available)), pm)
    results = run_recipe(recipe, out=args.out)
    print(f"accelcore: selected {results.get('selected') or 'none'}; "
          f"artifacts: {', '.join(results.get('artifacts', {}).values()) or 'none'}")
    print(f"accelcore: done in {results['wall_s']:.1f} s -> {results['run_dir']}")
    return 0
