"""The plugin manager: built-in and third-party plugins load the same way, by entry point.

Every distribution that declares ``[project.entry-points.accelcore]`` is a plugin; the built-in
ones in ``plugins/`` are registered exactly like that in our own pyproject. ``--plugin
module.path`` adds an unpackaged module and ``--plugin no:NAME`` (or ``no:NAME`` in a recipe's
``plugins:`` list) switches the plugin registered as NAME off, as pytest's ``-p no:NAME`` does. A
plugin that fails to import is recorded with its error and reported by ``list-plugins``; it only
becomes fatal when a recipe needs something that plugin would have provided.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType

import pluggy

from accelcore import hookspecs
from accelcore.errors import PluginError, one_line
from accelcore.interfaces import Declaration

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "accelcore"


@dataclass
class PluginRecord:
    """Where a plugin came from and whether it loaded."""

    name: str
    module: str
    distribution: str
    version: str
    error: str = ""
    disabled: bool = False


@dataclass(frozen=True)
class Provided:
    """A declaration together with the plugin that made it."""

    plugin: PluginRecord
    declaration: Declaration


class PluginManager(pluggy.PluginManager):
    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self._declared: list[Provided] | None = None
        self.entry_points_found = 0

    # -- switching off
    def disable(self, name: str) -> None:
        """Switch plugin ``name`` off (``--plugin no:NAME``): unregister it and keep it out."""
        if not name:
            raise PluginError("--plugin no:NAME: give the plugin name after 'no:'")
        if self.entry_points_found and name not in self.records:
            known = ", ".join(sorted(self.records)) or "none loaded"
            close = difflib.get_close_matches(name, list(self.records), n=1)
            hint = f" (did you mean 'no:{close[0]}'?)" if close else ""
            raise PluginError(f"--plugin no:{name}: no plugin named '{name}'{hint}; "
                              f"loaded: {known}")
        self.set_blocked(name)  # pluggy unregisters it and refuses to register it again
        if name in self.records:
            self.records[name].disabled = True
        self._declared = None

    def disabled(self) -> list[str]:
        return sorted(n for n, r in self.records.items() if r.disabled)

    def setup_problem(self) -> str:
        """Why nothing would load, in one line ('' when plugins were found)."""
        if self.entry_points_found:
            return ""
        try:
            importlib.metadata.distribution("accelcore")
            installed = True
        except importlib.metadata.PackageNotFoundError:
            installed = False
        if not installed:
            return ("no plugin loaded: accelcore is imported from a source checkout that is not "
                    "installed, so its entry points (the built-in plugins are registered that "
                    "way too) do not exist; run `pip install -e .` in the checkout")
        return (f"no plugin loaded: no distribution declares the '{ENTRY_POINT_GROUP}' "
                "entry-point group (reinstall accelcore: `pip install -e .`)")

    # -- loading
    def load_entry_points(self) -> None:
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP),
                         key=lambda e: e.name):
            self.entry_points_found += 1
            if ep.name in self.records:
                continue
            dist = getattr(ep, "dist", None)
            record = PluginRecord(
                name=ep.name, module=ep.value,
                distribution=dist.metadata["Name"] if dist else "?",
                version=dist.version if dist else "?",
            )
            self.records[ep.name] = record
            if self.is_blocked(ep.name):  # switched off before loading: never imported
                record.disabled = True
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin is reported, not fatal
                record.error = one_line(exc)
                log.warning("plugin %s (%s) failed to load: %s", ep.name, ep.value, record.error)
                continue
            self._register_module(module, ep.name, record)

    def load_module(self, path: str) -> None:
        """Load an unpackaged plugin module by import path (``--plugin module.path``)."""
        if path in self.records:
            return
        record = PluginRecord(name=path, module=path, distribution="(--plugin)", version="")
        self.records[path] = record
        try:
            module = importlib.import_module(path)
        except Exception as exc:
            record.error = one_line(exc)
            raise PluginError(f"--plugin {path}: cannot import: {record.error}") from None
        dist_version = getattr(module, "__version__", "")
        record.version = str(dist_version)
        self._register_module(module, path, record)

    def _register_module(self, module: ModuleType | object, name: str,
                         record: PluginRecord) -> None:
        # An entry point names a module of hook functions or one plugin object
        # (``package:plugin``, e.g. an ``accelcore.backend.Backend``); pluggy takes both.
        if self.is_registered(module):
            return
        try:
            self.register(module, name=name)
        except Exception as exc:  # e.g. a hookimpl with an unknown hook name
            record.error = one_line(exc)
            log.warning("plugin %s failed to register: %s", name, record.error)
        self._declared = None

    # -- what plugins provide
    def declarations(self) -> list[Provided]:
        if self._declared is None:
            provided: list[Provided] = []
            for impl in self.hook.accelcore_declare.get_hookimpls():
                record = self.records.get(impl.plugin_name) or PluginRecord(
                    impl.plugin_name, impl.plugin_name, "?", "?")
                try:
                    decls = impl.function() or []
                except Exception as exc:
                    record.error = f"declare failed: {one_line(exc)}"
                    continue
                provided.extend(Provided(record, d) for d in decls)
            self._declared = provided
        return self._declared

    def names(self, kind: str) -> list[str]:
        return sorted({p.declaration.name for p in self.declarations()
                       if p.declaration.kind == kind})

    def find(self, kind: str, name: str) -> Provided | None:
        for provided in self.declarations():
            if provided.declaration.kind == kind and provided.declaration.name == name:
                return provided
        return None

    def broken(self) -> list[PluginRecord]:
        return [r for r in self.records.values() if r.error and not r.disabled]

    def require(self, kind: str, name: str, key: str, available: bool = True) -> Declaration:
        """The declaration for ``name`` or a one-line error naming the recipe ``key``."""
        provided = self.find(kind, name)
        if provided is None:
            options = self.names(kind)
            close = difflib.get_close_matches(name, options, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            notes = [f"plugin '{r.name}' failed to load ({r.error})" for r in self.broken()]
            notes += [f"plugin '{n}' is switched off (no:{n})" for n in self.disabled()]
            if self.setup_problem():
                notes.append(self.setup_problem())
            note = f"; note: {'; '.join(notes)}" if notes else ""
            raise PluginError(f"{key}: unknown {kind} '{name}'{hint}; "
                              f"available: {', '.join(options) or 'none'}{note}")
        if available and not provided.declaration.available:
            raise PluginError(f"{key}: {kind} '{name}' is unavailable here: "
                              f"{provided.declaration.reason}")
        return provided.declaration


_MANAGER: PluginManager | None = None


def get_plugin_manager(extra_modules: Iterable[str] = ()) -> PluginManager:
    """The process-wide plugin manager, with entry points loaded (and any extra modules)."""
    global _MANAGER
    extra = list(extra_modules)
    switched_off = [p[3:].strip() for p in extra if p.startswith("no:")]
    if _MANAGER is None:
        _MANAGER = PluginManager()
        for name in switched_off:  # before loading, so their modules are never imported
            if not name:
                raise PluginError("--plugin no:NAME: give the plugin name after 'no:'")
            _MANAGER.set_blocked(name)
        _MANAGER.load_entry_points()
    for name in switched_off:
        _MANAGER.disable(name)
    for path in extra:
        if not path.startswith("no:"):
            _MANAGER.load_module(path)
    return _MANAGER


def reset_plugin_manager() -> None:
    """Forget the loaded plugins (tests use this after installing a plugin)."""
    global _MANAGER
    _MANAGER = None
