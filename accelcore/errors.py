"""Errors that reach the user as one clear line (never a bare traceback)."""

from __future__ import annotations


class AccelcoreError(Exception):
    """Base class: the CLI prints ``str(error)`` on one line and exits non-zero."""


class RecipeError(AccelcoreError):
    """A recipe is malformed: unknown key, wrong type, missing file, unknown name."""


class PluginError(AccelcoreError):
    """A plugin failed to load, or a needed plugin/method/strategy is unavailable."""


class DataError(AccelcoreError):
    """A dataset cannot be used as given (missing folder, corrupt json, bad ids)."""


class ImageReadError(DataError):
    """One image file cannot be read or decoded; ``path`` names it. Readers raise it so that
    callers can skip the file (``data.on_bad_image: skip``, ``accelcore predict``) or stop."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple:  # keep ``path`` across processes (loader workers, Ray)
        return (type(self), (str(self), self.path))


class CheckpointError(AccelcoreError):
    """A checkpoint cannot be loaded into the requested model."""


class BackendUnavailable(PluginError):
    """A backend cannot run on this machine; the message carries the reason."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``"Type: first line of the message"`` (at most ``limit`` characters): how every error
    reaches a report row, a plugin record or the terminal."""
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first.rstrip(": ")[:limit]
