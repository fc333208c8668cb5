"""The base of every backend plugin: one object, one method table, the conversion hooks.

A backend plugin subclasses :class:`Backend`, lists its methods in ``methods`` (name →
:class:`Method`), implements ``accelerate`` and ``load`` (or names a ``runtime`` module that
does), and its package exposes one instance, registered by entry point::

    [project.entry-points.accelcore]
    my_backend = "my_backend:plugin"

The base answers ``accelcore_declare`` from the table and ``accelcore_accelerate`` /
``accelcore_load_artifact`` for exactly the declared names (``None`` for anyone else's), after
checking that the method can run here. Declaring must stay cheap — ``list-plugins`` imports
every plugin — so availability is decided by ``importlib.util.find_spec`` (overridable), and
heavy libraries are imported only inside ``accelerate``/``load`` or the ``runtime`` module.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from accelcore import hookimpl
from accelcore.errors import BackendUnavailable
from accelcore.interfaces import AcceleratedModel, AccelerateRequest, Declaration


@dataclass(frozen=True)
class Method:
    """One row of a backend's method table.

    ``compute``: the precision the method computes in ("fp32", "bf16", "fp16", "int8");
    ``requires``: modules this method needs beyond the backend's own ``requires``.
    Plugins subclass it to add their own per-method settings.
    """

    summary: str
    compute: str = "fp32"
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reference(Method):
    """A plain-runtime baseline row: the runtime used directly, as its documentation says,
    measured beside the accelerated methods (declaration kind ``"reference"``).

    ``stock_runtime``: measure it under the stock process setup (no allocator tuning) — what a
    user has before installing accelcore — instead of the project's tuned one.
    """

    stock_runtime: bool = False


def module_missing(module: str) -> bool:
    """True if ``module`` cannot be imported (found by spec only; nothing is imported but the
    parents of a dotted name)."""
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a missing parent package of a dotted name
        return True


class Backend:
    """Base class of a backend plugin (see the module docstring)."""

    #: method name -> its table row
    methods: ClassVar[dict[str, Method]] = {}
    #: reference name -> its row (plain-runtime baselines; built by ``reference``)
    references: ClassVar[dict[str, Reference]] = {}
    #: modules every method needs (checked with find_spec at declare time)
    requires: ClassVar[tuple[str, ...]] = ()
    #: how to get a missing module, shown in the reason: e.g. "pip install 'accelcore[onnx]'"
    install: ClassVar[str] = ""
    #: distributions whose versions shape this backend's numbers (recorded in manifests)
    packages: ClassVar[tuple[str, ...]] = ()
    #: import path of a module with ``accelerate(method, model, request)`` and
    #: ``load(method, folder, manifest)``, imported on first use; ``None``: override them here
    runtime: ClassVar[str | None] = None

    # -- what a subclass may override
    def unavailable(self, method: str) -> str:
        """Why ``method`` cannot run here ('' if it can); must stay cheap (no heavy imports)."""
        row = self.methods.get(method) or self.references[method]
        for module in (*self.requires, *row.requires):
            if module_missing(module):
                hint = f" ({self.install})" if self.install else ""
                return f"{module} not installed{hint}"
        return ""

    def declarations(self) -> list[Declaration]:
        """One backend declaration per method; extend to declare more (e.g. a feature)."""
        out = []
        for name, method in self.methods.items():
            reason = self.unavailable(name)
            out.append(Declaration("backend", name, method.summary, available=not reason,
                                   reason=reason, compute=method.compute,
                                   packages=self.packages))
        for name, ref in self.references.items():
            reason = self.unavailable(name)
            out.append(Declaration("reference", name, ref.summary, available=not reason,
                                   reason=reason, compute=ref.compute, packages=self.packages,
                                   stock_runtime=ref.stock_runtime))
        return out

    def accelerate(self, method: str, model: Any, request: AccelerateRequest) -> AcceleratedModel:
        """Convert ``model`` (eval, raw-output mode, a private copy) for ``method``."""
        return self._runtime_module().accelerate(method, model, request)

    def load(self, method: str, folder: Path, manifest: dict) -> AcceleratedModel:
        """Rebuild ``method``'s forward from an artifact folder written by its ``save``."""
        return self._runtime_module().load(method, folder, manifest)

    def reference(self, name: str, model: Any, request: AccelerateRequest) -> AcceleratedModel:
        """Build reference ``name`` from ``model`` (same contract as ``accelerate``)."""
        return self._runtime_module().reference(name, model, request)

    # -- the hooks (pluggy registers bound methods of the plugin object)
    @hookimpl
    def accelcore_declare(self) -> list[Declaration]:
        return self.declarations()

    @hookimpl
    def accelcore_accelerate(self, method: str, model: Any,
                             request: AccelerateRequest) -> AcceleratedModel | None:
        if method in self.references:
            self._check(method)
            return self.reference(method, model, request)
        if method not in self.methods:
            return None
        self._check(method)
        return self.accelerate(method, model, request)

    @hookimpl
    def accelcore_load_artifact(self, method: str, folder: Path,
                                manifest: dict) -> AcceleratedModel | None:
        if method not in self.methods:
            return None
        self._check(method)
        return self.load(method, Path(folder), manifest)

    # -- internals
    def _check(self, method: str) -> None:
        reason = self.unavailable(method)
        if reason:
            raise BackendUnavailable(f"{method}: {reason}")

    def _runtime_module(self) -> Any:
        if self.runtime is None:
            raise NotImplementedError(f"{type(self).__name__}: set `runtime` or override "
                                      "accelerate() and load()")
        return importlib.import_module(self.runtime)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} methods={list(self.methods)}>"
