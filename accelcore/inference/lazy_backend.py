"""Hook glue shared by backend plugins whose runtime is imported only when a method is used.

Declaring must stay cheap (``list-plugins`` imports every plugin), so a plugin keeps its heavy
imports in a separate module that exposes ``accelerate(method, model, request)`` and
``load(method, folder)``; :class:`LazyBackend` answers the hooks for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelcore.errors import BackendUnavailable
from accelcore.interfaces import AcceleratedModel, AccelerateRequest, Declaration


class LazyBackend:
    """``summaries``: method → one-line summary; ``status(method)``: why it cannot run here
    ('' if it can), from package metadata alone; ``module``: import path of the runtime module."""

    def __init__(self, summaries: dict[str, str], status: Callable[[str], str],
                 module: str) -> None:
        self.summaries = summaries
        self.status = status
        self.module = module

    def declarations(self) -> list[Declaration]:
        decls = []
        for method, summary in self.summaries.items():
            reason = self.status(method)
            decls.append(Declaration(kind="backend", name=method, summary=summary,
                                     available=not reason, reason=reason))
        return decls

    def _runtime(self, method: str) -> Any:
        reason = self.status(method)
        if reason:
            raise BackendUnavailable(f"{method}: {reason}")
        return importlib.import_module(self.module)

    def accelerate(self, method: str, model: Any,
                   request: AccelerateRequest) -> AcceleratedModel | None:
        if method not in self.summaries:
            return None
        return self._runtime(method).accelerate(method, model, request)

    def load(self, method: str, folder: Path) -> AcceleratedModel | None:
        if method not in self.summaries:
            return None
        return self._runtime(method).load(method, Path(folder))
