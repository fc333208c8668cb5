"""Find and build models by name: ``list_models`` / ``create_model`` (timm-style helpers).

There is one way to find a model: the model plugins. A plugin declares each model name
(``accelcore_declare``, kind ``"model"``) and builds it (``accelcore_build_model``); both helpers
here are thin wrappers over the plugin manager, not a second registry. ``create_model`` goes
through exactly the build path of a recipe (:func:`accelcore.build.build_detector`: the name is
checked against the declarations, the plugin builds it, the result is checked against
:class:`~accelcore.interfaces.Detector`), so a model installed by entry point is available here
with no registration step, and a recipe and ``create_model`` can never disagree about a name.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any

from accelcore.errors import RecipeError
from accelcore.interfaces import Detector


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the declared models, optionally filtered by a shell-style pattern."""
    from accelcore.plugins import get_plugin_manager

    names = get_plugin_manager().names("model")
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def create_model(name: str, **options: Any) -> Detector:
    """Build a model: ``create_model("yolox_nano", num_classes=80)``.

    ``options`` are ``model.*`` recipe keys (``num_classes``, ``input_size``, ``checkpoint``, …).
    """
    from accelcore.build import build_detector
    from accelcore.config import ModelConfig
    from accelcore.plugins import get_plugin_manager

    keys = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "name"]
    for key in options:
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"create_model('{name}'): unknown option '{key}'{hint}; "
                              f"allowed: {', '.join(keys)}")
    return build_detector(get_plugin_manager(), ModelConfig(name=name, **options))
