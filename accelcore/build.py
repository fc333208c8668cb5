"""Build the recipe's model and datasets through their hooks — the one way the core gets either.

The pipeline, the training loop, ``create_model`` and artifact loading all come here, so every
model is checked against :class:`~accelcore.interfaces.Detector` in one place and no caller
needs the orchestrator (``accelcore.pipeline``) to build something.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from accelcore.errors import PluginError
from accelcore.interfaces import Detector, missing_detector_members
from accelcore.plugins import PluginManager


def _notes(pm: PluginManager) -> str:
    """Why a plugin that might have answered did not load (empty when all loaded)."""
    notes = [f"plugin '{r.name}' failed to load ({r.error})" for r in pm.broken()]
    return f"; note: {'; '.join(notes)}" if notes else ""


def default_model(pm: PluginManager) -> str:
    """The model a recipe without ``model.name`` gets: the one a model plugin marks default."""
    defaults = sorted({p.declaration.name for p in pm.declarations()
                       if p.declaration.kind == "model" and p.declaration.default})
    if len(defaults) != 1:
        why = "no installed model plugin marks a default" if not defaults else (
            f"several are marked default ({', '.join(defaults)})")
        raise PluginError(f"model.name: not set and {why}; set it to one of: "
                          f"{', '.join(pm.names('model')) or 'none installed'}{_notes(pm)}")
    return defaults[0]


def model_name(pm: PluginManager, config: Any) -> str:
    """``config.name``, or the default model when the recipe names none."""
    return config.name if config.name is not None else default_model(pm)


def build_detector(pm: PluginManager, config: Any) -> Detector:
    """The model described by ``config`` (a ``ModelConfig``), built by the plugin that owns
    ``config.name`` through ``accelcore_build_model``, checked against ``Detector``."""
    if config.name is None:
        config = dataclasses.replace(config, name=default_model(pm))
    pm.require("model", config.name, "model.name")
    model = pm.hook.accelcore_build_model(config=config)
    if model is None:
        raise PluginError(f"model.name: model '{config.name}' is declared but no plugin built "
                          f"it (its accelcore_build_model returned None){_notes(pm)}")
    missing = missing_detector_members(model)
    if missing:
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        raise PluginError(f"model.name: model '{config.name}' ({kind}) does not satisfy "
                          f"accelcore.interfaces.Detector: missing {', '.join(missing)}")
    return model


def build_model(pm: PluginManager, recipe: Any, checkpoint: str | None = None) -> Detector:
    """The recipe's model; with ``checkpoint``, those weights instead of ``model.checkpoint``
    (the trained weights of this run: loaded strictly, never as a fine-tune start)."""
    config = recipe.model
    if checkpoint is not None:
        config = dataclasses.replace(config, checkpoint=checkpoint, finetune=False)
    return build_detector(pm, config)


def build_data(pm: PluginManager, recipe: Any, split: str, run_dir: Path) -> Any:
    """The ``split`` dataset, from whichever data plugin recognises the recipe's ``data``
    section (the core does not name data sources; each data plugin decides from the config)."""
    dataset = pm.hook.accelcore_build_data(config=recipe.data, split=split, run_dir=run_dir)
    if dataset is None:
        plugins = ", ".join(pm.names("data")) or "none"
        raise PluginError(f"data: no data plugin builds the '{split}' split from this data "
                          f"section (installed data plugins: {plugins}){_notes(pm)}")
    return dataset
