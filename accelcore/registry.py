"""Model registry in the style of timm: ``register_model`` / ``create_model`` / ``list_models``.

Model plugins register their constructors when their module is imported. The registry asks the
plugin manager to load every ``accelcore`` entry point before the first lookup, so
``create_model("yolox_nano")`` works without the caller importing any plugin by name.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any

from accelcore.errors import RecipeError

ModelFactory = Callable[..., Any]
_MODELS: dict[str, ModelFactory] = {}


def register_model(fn: ModelFactory | None = None, *, name: str | None = None) -> Any:
    """Register a model constructor under ``name`` (default: the function's name).

    Usable as ``@register_model`` or ``@register_model(name="custom")``.
    """

    def decorate(factory: ModelFactory) -> ModelFactory:
        _MODELS[name or factory.__name__] = factory
        return factory

    return decorate(fn) if fn is not None else decorate


def _ensure_plugins_loaded() -> None:
    from accelcore.plugins import get_plugin_manager

    get_plugin_manager()


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of registered models, optionally filtered by a shell-style pattern."""
    _ensure_plugins_loaded()
    names = sorted(_MODELS)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def is_model(name: str) -> bool:
    _ensure_plugins_loaded()
    return name in _MODELS


def create_model(name: str, **kwargs: Any) -> Any:
    """Build a registered model: ``create_model("yolox_nano", num_classes=80)``."""
    _ensure_plugins_loaded()
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        allowed = ", ".join(sorted(_MODELS)) or "none registered"
        raise RecipeError(f"unknown model '{name}'{hint}; available: {allowed}")
    return _MODELS[name](**kwargs)
