"""``accelcore.backend.Backend``: the method table, dispatch by declared name, availability,
the lazily imported runtime module, and a third-party backend registered as one object."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
from inference_helpers import images, raw_model, request

from accelcore.backend import Backend, Method
from accelcore.errors import BackendUnavailable
from accelcore.interfaces import AcceleratedModel, AccelerateRequest
from accelcore.plugins import PluginManager, get_plugin_manager


class Eager(Backend):
    methods = {
        "eager_a": Method("runs the model as it is", "fp32"),
        "eager_needs_lib": Method("needs a library nobody has", "int8",
                                  requires=("no_such_module_xyz",)),
    }
    install = "pip install nothing"
    packages = ("pyyaml",)

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def accelerate(self, method: str, model, request: AccelerateRequest) -> AcceleratedModel:
        self.calls.append(("accelerate", method))
        return AcceleratedModel(method=method, precision="fp32", forward=model)

    def load(self, method: str, folder: Path, manifest: dict) -> AcceleratedModel:
        self.calls.append(("load", method))
        return AcceleratedModel(method=method, precision="fp32", forward=lambda x: x)


class Other(Backend):
    methods = {"other_b": Method("another plugin's method", "bf16")}

    def accelerate(self, method: str, model, request: AccelerateRequest) -> AcceleratedModel:
        return AcceleratedModel(method=method, precision="bf16", forward=model)


def test_declarations_come_from_the_table():
    decls = {d.name: d for d in Eager().accelcore_declare()}
    assert set(decls) == {"eager_a", "eager_needs_lib"}
    a, lib = decls["eager_a"], decls["eager_needs_lib"]
    assert (a.kind, a.available, a.reason, a.compute, a.packages) == (
        "backend", True, "", "fp32", ("pyyaml",))
    assert not lib.available and lib.compute == "int8"
    assert lib.reason == "no_such_module_xyz not installed (pip install nothing)"


def test_dispatch_only_by_declared_names(tmp_path):
    plugin = Eager()
    model = raw_model(prefer_yolox=False)
    assert plugin.accelcore_accelerate("other_b", model, request(tmp_path)) is None
    assert plugin.accelcore_load_artifact("other_b", tmp_path, {}) is None
    assert plugin.accelcore_accelerate("eager_a", model, request(tmp_path)).method == "eager_a"
    assert plugin.accelcore_load_artifact("eager_a", str(tmp_path), {}).method == "eager_a"
    with pytest.raises(BackendUnavailable, match="^eager_needs_lib: no_such_module_xyz not inst"):
        plugin.accelcore_accelerate("eager_needs_lib", model, request(tmp_path))
    with pytest.raises(BackendUnavailable):
        plugin.accelcore_load_artifact("eager_needs_lib", tmp_path, {})
    assert plugin.calls == [("accelerate", "eager_a"), ("load", "eager_a")]  # never the others


def test_dotted_requirement_with_a_missing_parent_is_just_missing():
    class Dotted(Backend):
        methods = {"d": Method("x")}
        requires = ("no_such_parent_xyz.torch",)

    assert Dotted().unavailable("d") == "no_such_parent_xyz.torch not installed"


def test_two_backend_objects_share_one_plugin_manager(tmp_path):
    pm = PluginManager()
    pm.register(Eager(), name="eager")
    pm.register(Other(), name="other")
    assert {"eager_a", "eager_needs_lib", "other_b"} <= set(pm.names("backend"))
    model = raw_model(prefer_yolox=False)
    out = pm.hook.accelcore_accelerate(method="other_b", model=model, request=request(tmp_path))
    assert out.precision == "bf16"
    out = pm.hook.accelcore_accelerate(method="eager_a", model=model, request=request(tmp_path))
    assert out.precision == "fp32" and torch.equal(out(images(1)), model(images(1)))
    assert pm.hook.accelcore_accelerate(method="nobody", model=model,
                                        request=request(tmp_path)) is None


def test_versions_collect_the_declared_packages():
    from accelcore.inference.latency import versions

    pm = PluginManager()
    pm.register(Eager(), name="eager")
    found = versions(pm)
    assert found["pyyaml"] == importlib.metadata.version("pyyaml")
    assert {"python", "accelcore", "torch", "numpy"} <= set(found)
    assert "pyyaml" not in versions()  # only what a plugin declared


THIRD_PARTY = '''
from accelcore.backend import Backend, Method


class Lazy(Backend):
    methods = {"lazy_fp32": Method("eager forward from a lazily imported module")}
    runtime = "accelcore_lazy_backend.runtime"


plugin = Lazy()
'''

RUNTIME = '''
import torch

from accelcore.interfaces import AcceleratedModel


def accelerate(method, model, request):
    def forward(images):
        with torch.inference_mode():
            return model(images).float()

    return AcceleratedModel(method=method, precision="fp32", forward=forward,
                            save=lambda folder: None)


def load(method, folder, manifest):
    raise FileNotFoundError(f"{folder}: nothing saved")
'''


def test_third_party_backend_object_by_entry_point(tmp_path, monkeypatch, fresh_plugins):
    """A distribution whose entry point names ``package:plugin``; heavy code in ``runtime``."""
    import sys

    package = tmp_path / "accelcore_lazy_backend"
    package.mkdir()
    (package / "__init__.py").write_text(THIRD_PARTY)
    (package / "runtime.py").write_text(RUNTIME)
    info = tmp_path / "accelcore_lazy_backend-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: accelcore-lazy-backend\n"
                                   "Version: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[accelcore]\nlazy = accelcore_lazy_backend:plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm = get_plugin_manager()
    record = pm.records["lazy"]
    assert not record.error and record.module == "accelcore_lazy_backend:plugin"
    assert pm.require("backend", "lazy_fp32", "accelerate.methods[0]").available
    assert "accelcore_lazy_backend.runtime" not in sys.modules  # declaring stayed cheap
    model = raw_model(prefer_yolox=False)
    out = pm.hook.accelcore_accelerate(method="lazy_fp32", model=model,
                                       request=request(tmp_path))
    x = images(2)
    torch.testing.assert_close(out(x), model(x))
    with pytest.raises(FileNotFoundError, match="nothing saved"):
        pm.hook.accelcore_load_artifact(method="lazy_fp32", folder=tmp_path, manifest={})


def test_builtin_backends_are_objects_with_their_methods():
    pm = get_plugin_manager()
    expected = {
        "torch": {"original", "bf16", "bf16_channels_last"},
        "jit": {"jit_fp32", "jit_bf16"},
        "inductor": {"inductor_fp32", "inductor_bf16", "inductor_int8"},
        "openvino": {"openvino_fp32", "openvino_bf16", "openvino_int8"},
        "onnxruntime": {"onnxruntime_fp32", "onnxruntime_int8_qlinear",
                        "onnxruntime_int8_integer"},
        "inc": {"int8"},
        "ipex": {"fp32_ipex", "bf16_ipex", "jit_fp32_ipex", "jit_fp32_ipex_channels_last"},
    }
    for name, methods in expected.items():
        plugin = pm.get_plugin(name)
        assert isinstance(plugin, Backend), name
        assert set(plugin.methods) == methods, name
        assert pm.records[name].module.endswith(":plugin")
    assert len(set().union(*expected.values())) == 19
    assert set(pm.names("backend")) >= set().union(*expected.values())
