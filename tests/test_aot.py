"""Ahead-of-time compiled artifacts (accelcore.inference.aot): build, reload, one mapping per
package per process, and the just-in-time fallback where the package cannot run."""

from __future__ import annotations

import pytest
import torch
from inference_helpers import SIZE, TinyRawNet, images, rel_err

from accelcore.inference import aot
from accelcore.inference.pt2e import PROGRAM_FILE
from accelcore.machine import cpu_flags


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyRawNet().eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model compiled ahead of time and saved: (folder, details, output on images())."""
    work = tmp_path_factory.mktemp("aot-work")
    model = _model()
    forward, save, details = aot.compile_ahead(model, SIZE, work)
    folder = tmp_path_factory.mktemp("aot-artifact")
    save(folder)
    x = images()
    out = forward(x)
    assert rel_err(out, _model()(x)) < 1e-4
    return folder, details, out


def test_package_is_saved_with_its_target(saved):
    folder, details, _ = saved
    assert (folder / aot.PACKAGE_FILE).is_file() and (folder / PROGRAM_FILE).is_file()
    info = details["compiled"]
    assert info["mode"] == "aot" and info["package_mb"] > 0
    assert info["target"] == aot.compile_target()
    assert aot.target_mismatch(info["target"]) is None


def test_reload_runs_the_package_once_per_process(saved):
    folder, details, out = saved
    x = images()
    forward, _, info = aot.load_compiled(folder, details)
    assert info["compiled"]["mode"] == "aot"
    torch.testing.assert_close(forward(x), out)
    mapped = len(aot._LOADED)
    for _ in range(3):  # glibc cannot unload the library: loads must not map new copies
        again, _, _ = aot.load_compiled(folder, details)
        torch.testing.assert_close(again(x), out)
    assert len(aot._LOADED) == mapped


def test_other_cpu_compiles_again_from_the_portable_program(saved, monkeypatch, tmp_path):
    folder, details, out = saved
    # another CPU: without AVX-512 if this one has it, with it if not
    other = "avx2 fma" if "avx512f" in cpu_flags() else "avx2 fma avx512f avx512bw avx512vl"
    monkeypatch.setenv("ACCELCORE_CPU_FLAGS", other)
    forward, save, info = aot.load_compiled(folder, details)
    assert info["compiled"]["mode"] == "jit"
    assert "cpu_flags" in info["compiled"]["reason"]
    torch.testing.assert_close(forward(images()), out, rtol=1e-3, atol=1e-3)
    save(tmp_path)  # re-saving keeps the portable program (the package is not for this CPU)
    assert (tmp_path / PROGRAM_FILE).is_file() and not (tmp_path / aot.PACKAGE_FILE).exists()


def test_target_mismatch_names_what_differs():
    here = aot.compile_target()
    assert aot.target_mismatch(None) == "the artifact records no compile target"
    reason = aot.target_mismatch({**here, "torch": "2.8.0"})
    assert reason is not None and "torch=2.8.0" in reason
    other_isa = "avx2" if here["vec_isa"] != "avx2" else "avx512"
    assert "vec_isa" in (aot.target_mismatch({**here, "vec_isa": other_isa}) or "")


def test_a_failed_ahead_of_time_compile_falls_back_to_jit(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise RuntimeError("unsupported op\nmore")

    monkeypatch.setattr(aot, "compile_package", fail)
    model = _model()
    forward, save, details = aot.compile_ahead(model, SIZE, tmp_path / "work")
    assert details["compiled"] == {
        "mode": "jit", "reason": "AOTInductor failed: RuntimeError: unsupported op"}
    x = images()
    assert rel_err(forward(x), _model()(x)) < 1e-4
    (tmp_path / "artifact").mkdir()
    save(tmp_path / "artifact")
    assert not (tmp_path / "artifact" / aot.PACKAGE_FILE).exists()
    reloaded, _, info = aot.load_compiled(tmp_path / "artifact", details)
    assert info["compiled"] == {"mode": "jit",
                                "reason": "the artifact has no ahead-of-time package"}
    torch.testing.assert_close(reloaded(x), forward(x), rtol=1e-3, atol=1e-3)
