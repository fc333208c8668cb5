"""accelcore: fast CPU training and inference of object detectors, every backend a plugin."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("accelcore")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"

#: Decorate plugin functions with this to implement a hook from ``accelcore.hookspecs``.
hookimpl = pluggy.HookimplMarker("accelcore")

from accelcore.registry import create_model, list_models  # noqa: E402


def load(path: str):  # noqa: ANN201 - returns accelcore.inference.artifact.LoadedModel
    """Load an artifact folder written by ``accelcore run``/``optimize`` for prediction."""
    from accelcore.inference.artifact import load_artifact

    return load_artifact(path)


__all__ = ["__version__", "create_model", "hookimpl", "list_models", "load"]
