"""The pipeline: a recipe's stages run in fixed order, each through its hook.

build model ─▶ build data ─▶ train ─▶ accelerate ─▶ validate ─▶ report

Everything a run produces lands in one run folder (resolved recipe, logs, metrics, checkpoints,
artifacts, reports, ``results.json``).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from accelcore.build import build_data, build_model, model_name
from accelcore.config import STAGES, Recipe, to_dict
from accelcore.errors import PluginError, RecipeError
from accelcore.interfaces import TrainJob
from accelcore.plugins import PluginManager, get_plugin_manager

log = logging.getLogger(__name__)


def new_run_dir(name: str, base: str | Path = "runs") -> Path:
    """A fresh ``runs/<name>-<timestamp>`` folder; never reuses an existing one."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        candidate = base / (f"{name}-{stamp}" + (f"-{n}" if n else ""))
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RecipeError(f"cannot create a new run folder under {base}")


def prepare_run_dir(recipe: Recipe, out: str | Path | None, resume: str | Path | None) -> Path:
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "checkpoints" / "last.pth").is_file():
            raise RecipeError(f"--resume {run_dir}: no checkpoints/last.pth in that folder")
        return run_dir
    if out is None:
        return new_run_dir(recipe.name)
    run_dir = Path(out)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RecipeError(f"--out {run_dir}: folder exists and is not empty; "
                          "choose a new folder (runs are never overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_names(recipe: Recipe, pm: PluginManager) -> None:
    """Fail early, with the recipe key, for names no loaded plugin provides."""
    # Data sources are not named here: the data plugin that recognises the recipe's data
    # section builds it (accelcore.build.build_data), and says so when none does.
    pm.require("model", model_name(pm, recipe.model), "model.name")
    if "train" in recipe.stages:
        pm.require("strategy", recipe.train.strategy, "train.strategy")
        if recipe.train.precision != "auto":  # auto picks a declared one per CPU
            pm.require("precision", recipe.train.precision, "train.precision")
    if "accelerate" in recipe.stages:
        from accelcore.inference.accelerate import resolve_methods

        resolve_methods(recipe.accelerate.methods, pm)  # unknown names are errors, here first
    if "report" in recipe.stages:
        for i, fmt in enumerate(recipe.report.formats):
            pm.require("reporter", fmt, f"report.formats[{i}]")


def run_recipe(recipe: Recipe, out: str | Path | None = None,
               resume: str | Path | None = None) -> dict:
    """Run the recipe's stages; return (and write) the results."""
    pm = get_plugin_manager(recipe.plugins)
    check_names(recipe, pm)
    run_dir = prepare_run_dir(recipe, out, resume)
    resolved = "recipe.resumed.yaml" if resume is not None else "recipe.yaml"
    (run_dir / resolved).write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    print(f"accelcore: run folder {run_dir}")

    results: dict[str, Any] = {"recipe": recipe.name, "run_dir": str(run_dir),
                               "stages": [s for s in STAGES if s in recipe.stages]}
    checkpoint = recipe.model.checkpoint
    started = time.perf_counter()
    for stage in results["stages"]:
        t0 = time.perf_counter()
        if stage == "train":
            from accelcore.training.launch import launch
            from accelcore.training.loop import fit

            job = TrainJob(recipe=recipe, run_dir=run_dir,
                           resume=Path(resume) if resume is not None else None)
            # The strategy decides how the ranks start; every rank runs the core loop.
            summary = launch(pm, recipe, functools.partial(fit, job),
                             recipe.train.num_processes)
            results["train"] = summary
            checkpoint = summary.get("best_checkpoint") or summary.get("last_checkpoint")
        elif stage == "accelerate":
            from accelcore.inference.accelerate import run_accelerate

            model = build_model(pm, recipe, checkpoint)
            val = build_data(pm, recipe, "val", run_dir)
            calib = build_data(pm, recipe, "train", run_dir)
            results.update(run_accelerate(recipe, model, run_dir, val, calib, pm))
        elif stage == "validate":
            results["validate"] = validate(pm, recipe, run_dir, checkpoint)
        elif stage == "report":
            written = pm.hook.accelcore_report(results=results, run_dir=run_dir,
                                               formats=recipe.report.formats)
            results["reports"] = [str(p) for paths in written for p in (paths or [])]
        results.setdefault("stage_seconds", {})[stage] = round(time.perf_counter() - t0, 2)
    results["wall_s"] = round(time.perf_counter() - started, 2)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def validate(pm: PluginManager, recipe: Recipe, run_dir: Path, checkpoint: str | None) -> dict:
    """COCO metrics of the (trained or given) eager fp32 model on the validation split."""
    from accelcore.predictor import Predictor

    model = build_model(pm, recipe, checkpoint).eval()
    dataset = build_data(pm, recipe, "val", run_dir)
    predictor = Predictor(model, model, raw=False, conf_thre=recipe.validate.conf_thre,
                          nms_thre=recipe.validate.nms_thre)
    metrics = pm.hook.accelcore_validate(
        predictor=predictor, dataset=dataset, options=recipe.validate,
        input_size=tuple(model.input_size), out_dir=run_dir / "validate")
    if metrics is None:
        raise PluginError("validate: no plugin implements accelcore_validate for this dataset")
    (run_dir / "validate.json").write_text(json.dumps(metrics, indent=2, default=str))
    print(f"accelcore: validate AP50:95 {metrics.get('ap50_95', float('nan')):.4f} "
          f"AP50 {metrics.get('ap50', float('nan')):.4f}")
    return metrics
