"""The plugin manager: entry points, --plugin modules, broken plugins, and a real third-party
plugin that adds an accelerate method and shows up in a run's report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from accelcore.errors import PluginError
from accelcore.plugins import get_plugin_manager

REPO = Path(__file__).resolve().parents[1]

THIRD_PARTY_PLUGIN = '''
"""A third-party accelcore plugin: one accelerate method, eager fp32 under inference_mode."""
import torch
import accelcore
from accelcore.interfaces import AcceleratedModel, Declaration

__version__ = "0.3.1"


@accelcore.hookimpl
def accelcore_declare():
    return [Declaration(kind="backend", name="thirdparty_fp32",
                        summary="eager fp32 under inference_mode (third-party example)")]


@accelcore.hookimpl
def accelcore_accelerate(method, model, request):
    if method != "thirdparty_fp32":
        return None
    model = model.eval()

    def forward(images):
        with torch.inference_mode():
            return model(images).float()

    return AcceleratedModel(method=method, precision="fp32", forward=forward)
'''


def install_on_path(root: Path, dist: str, module: str, source: str,
                    version: str = "0.3.1") -> None:
    """Put a package and its dist-info (with an ``accelcore`` entry point) under ``root`` —
    exactly what ``pip install`` leaves in site-packages, so importlib.metadata finds it."""
    (root / module).mkdir(parents=True)
    (root / module / "__init__.py").write_text(source)
    # Wheel naming: the distribution part of a dist-info folder never contains "-".
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[accelcore]\n{dist} = {module}\n")


def test_builtin_plugins_load_through_entry_points(fresh_plugins) -> None:
    pm = get_plugin_manager()
    for name in ("yolox", "coco", "precision", "strategies", "torch", "reports"):
        assert name in pm.records, f"built-in plugin {name} not registered by entry point"
        assert pm.records[name].distribution == "accelcore"
    assert "yolox_nano" in pm.names("model")


def test_third_party_entry_point_and_broken_plugin(tmp_path: Path, monkeypatch,
                                                   fresh_plugins) -> None:
    install_on_path(tmp_path, "accelcore-thirdparty", "accelcore_thirdparty", THIRD_PARTY_PLUGIN)
    install_on_path(tmp_path, "accelcore-broken", "accelcore_broken",
                    "raise ImportError('needs libfoo.so')\n", version="1.0")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = get_plugin_manager()
    decl = pm.require("backend", "thirdparty_fp32", "accelerate.methods[0]")
    assert decl.available
    record = pm.records["accelcore-thirdparty"]
    assert (record.distribution, record.version) == ("accelcore-thirdparty", "0.3.1")
    broken = pm.records["accelcore-broken"]
    assert "needs libfoo.so" in broken.error  # reported, not fatal
    with pytest.raises(PluginError) as info:
        pm.require("backend", "thirdparty_fp33", "accelerate.methods[1]")
    message = str(info.value)
    assert "did you mean 'thirdparty_fp32'" in message
    assert "accelcore-broken" in message and "\n" not in message


def test_plugin_module_option(tmp_path: Path, monkeypatch, fresh_plugins) -> None:
    (tmp_path / "loose_plugin.py").write_text(THIRD_PARTY_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = get_plugin_manager(["loose_plugin"])
    assert pm.find("backend", "thirdparty_fp32") is not None
    with pytest.raises(PluginError, match="cannot import"):
        get_plugin_manager(["no_such_module_xyz"])


def run_cli(*args: str, env_path: Path | None = None, cwd: Path | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(env_path),
                                                          env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "accelcore", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def test_list_plugins_shows_third_party(tmp_path: Path) -> None:
    install_on_path(tmp_path, "accelcore-thirdparty", "accelcore_thirdparty", THIRD_PARTY_PLUGIN)
    proc = run_cli("list-plugins", "--json", env_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    mine = [r for r in rows if r["provides"] == "thirdparty_fp32"]
    assert mine and mine[0]["distribution"] == "accelcore-thirdparty"
    assert mine[0]["available"] is True and mine[0]["kind"] == "backend"
    kinds = {r["kind"] for r in rows}
    assert {"model", "data", "precision", "strategy", "backend", "reporter"} <= kinds


TINY_RUN = [
    "--set", "model.num_classes=4", "--set", "model.input_size=[128,128]",
    "--set", "data.synthetic={images: 8, val_images: 4, size: 128, num_classes: 4}",
    "--set", "accelerate.batch_size=2", "--set", "accelerate.calibration_images=4",
    "--set", "accelerate.latency={warmup: 1, min_runs: 2, min_seconds: 0.05}",
]


@pytest.mark.slow
def test_third_party_method_runs_and_is_reported(tmp_path: Path) -> None:
    site = tmp_path / "site"
    install_on_path(site, "accelcore-thirdparty", "accelcore_thirdparty", THIRD_PARTY_PLUGIN)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: thirdparty
        stages: [accelerate, report]
        data:
          synthetic: {{cache_dir: {tmp_path / 'cache'}}}
        accelerate:
          methods: [original, thirdparty_fp32]
          save: none
        report:
          formats: [json, md]
    """))
    out = tmp_path / "run"
    proc = run_cli("run", str(recipe), "--out", str(out), *TINY_RUN, env_path=site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    by_name = {m["method"]: m for m in report["methods"]}
    assert by_name["thirdparty_fp32"]["status"] == "ok", by_name["thirdparty_fp32"]
    assert by_name["thirdparty_fp32"]["latency_ms"] > 0
    # Same weights, same post-processing: the third-party method scores like the original.
    assert abs(by_name["thirdparty_fp32"]["ap50_95"] - by_name["original"]["ap50_95"]) < 1e-6
    assert "thirdparty_fp32" in (out / "report.md").read_text()
