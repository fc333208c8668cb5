"""Switching plugins off (``--plugin no:NAME`` / ``plugins: [no:NAME]``) and the message a source
checkout without an install gets instead of an empty plugin list."""

from __future__ import annotations

import importlib.metadata
import sys

import pytest
from test_plugins import install_on_path

from accelcore.errors import PluginError
from accelcore.plugins import PluginManager, get_plugin_manager

NOISY_PLUGIN = '''
import accelcore
from accelcore.interfaces import Declaration

IMPORTED = True


@accelcore.hookimpl
def accelcore_declare():
    return [Declaration(kind="backend", name="noisy_fp32", summary="test plugin")]
'''


@pytest.fixture
def noisy_plugin(tmp_path, monkeypatch, fresh_plugins):
    install_on_path(tmp_path, "noisy-plugin", "noisy_plugin_mod", NOISY_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield "noisy-plugin"
    sys.modules.pop("noisy_plugin_mod", None)


def test_switched_off_plugin_is_never_imported(noisy_plugin):
    pm = get_plugin_manager([f"no:{noisy_plugin}"])
    assert "noisy_plugin_mod" not in sys.modules
    assert pm.records[noisy_plugin].disabled
    assert "noisy_fp32" not in pm.names("backend")
    assert pm.disabled() == [noisy_plugin]
    assert pm.broken() == []


def test_plugin_loads_without_the_switch(noisy_plugin):
    pm = get_plugin_manager()
    assert "noisy_fp32" in pm.names("backend")
    assert "noisy_plugin_mod" in sys.modules


def test_switching_off_an_already_loaded_plugin_removes_what_it_declared(fresh_plugins):
    pm = get_plugin_manager()
    assert "jit_fp32" in pm.names("backend")
    pm = get_plugin_manager(["no:jit"])
    assert "jit_fp32" not in pm.names("backend")
    with pytest.raises(PluginError, match=r"accelerate.methods\[0\]: unknown backend 'jit_fp32'"
                                          r".*plugin 'jit' is switched off \(no:jit\)"):
        pm.require("backend", "jit_fp32", "accelerate.methods[0]")


def test_recipe_plugins_key_switches_off(fresh_plugins, tmp_path):
    from accelcore.config import load_recipe
    from accelcore.pipeline import run_recipe

    recipe = load_recipe(data={"stages": ["accelerate"], "plugins": ["no:jit"],
                               "accelerate": {"methods": ["jit_fp32"]}})
    with pytest.raises(PluginError, match="switched off"):
        run_recipe(recipe, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()  # failed before creating the run folder


def test_unknown_name_is_one_line_with_a_suggestion(fresh_plugins):
    get_plugin_manager()
    with pytest.raises(PluginError) as err:
        get_plugin_manager(["no:ipx"])
    text = str(err.value)
    assert "\n" not in text
    assert "no plugin named 'ipx'" in text and "did you mean 'no:ipex'" in text


def test_list_plugins_shows_the_switched_off_plugin(fresh_plugins):
    from accelcore.commands.list_plugins import rows

    table = rows(extra=["no:inc"])
    assert not any(r["plugin"] == "inc" and r["kind"] == "backend" for r in table)
    off = [r for r in table if r["plugin"] == "inc"]
    assert off and off[0]["reason"] == "switched off (no:inc)"


def test_source_checkout_without_install_says_why_nothing_loaded(monkeypatch):
    def no_distribution(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: [])
    monkeypatch.setattr(importlib.metadata, "distribution", no_distribution)
    pm = PluginManager()
    pm.load_entry_points()
    assert "source checkout" in pm.setup_problem() and "pip install -e ." in pm.setup_problem()
    with pytest.raises(PluginError, match="not installed.*pip install -e"):
        pm.require("model", "yolox_nano", "model.name")


def test_installed_checkout_has_no_setup_problem(fresh_plugins):
    assert get_plugin_manager().setup_problem() == ""
