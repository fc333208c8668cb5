"""Machine-aware defaults: ``doctor`` on faked CPU flag sets, ``train.precision: auto`` and
``accelerate.methods: auto`` choosing per CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from accelcore.machine import precision_support
from accelcore.training.auto_precision import resolve_precision

ZEN3 = "fpu sse2 avx avx2 fma"  # AVX2 only
ZEN4 = ZEN3 + " avx512f avx512bw avx512vl avx512dq avx512_vnni avx512_bf16"
SAPPHIRE_RAPIDS = ZEN4 + " avx512_fp16 amx_tile amx_bf16 amx_int8"

FAKE_BACKENDS = textwrap.dedent('''
    import accelcore
    from accelcore.interfaces import Declaration


    @accelcore.hookimpl
    def accelcore_declare():
        return [Declaration("backend", "fake_fp32", "x", compute="fp32"),
                Declaration("backend", "fake_bf16", "x", compute="bf16"),
                Declaration("backend", "fake_int8", "x", compute="int8"),
                Declaration("backend", "fake_gone", "x", available=False, reason="no lib"),
                Declaration("backend", "fake_any", "x")]
''')


@pytest.mark.parametrize("flags, bf16, int8", [(ZEN3, "emulated", "native"),
                                               (ZEN4, "native", "native"),
                                               (SAPPHIRE_RAPIDS, "native", "native"),
                                               ("fpu sse2", "absent", "absent")])
def test_precision_support_per_cpu(flags, bf16, int8):
    support = precision_support(set(flags.split()))
    assert support["bf16"] == bf16 and support["int8"] == int8


@pytest.mark.parametrize("flags, precision", [(ZEN3, "32"), (ZEN4, "bf16"),
                                              (SAPPHIRE_RAPIDS, "bf16")])
def test_auto_training_precision_per_cpu(flags, precision):
    choice = resolve_precision("auto", False, set(flags.split()))
    assert (choice.precision, choice.channels_last) == (precision, True)
    assert choice.reason.startswith("auto:")


def test_explicit_precision_is_kept_exactly():
    choice = resolve_precision("bf16", False, set(ZEN3.split()))
    assert (choice.precision, choice.channels_last) == ("bf16", False)


@pytest.fixture
def fake_pm(tmp_path, monkeypatch, fresh_plugins):
    (tmp_path / "fake_backends.py").write_text(FAKE_BACKENDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    from accelcore.plugins import get_plugin_manager

    yield get_plugin_manager(["fake_backends"])
    sys.modules.pop("fake_backends", None)


def test_methods_auto_skips_emulated_bf16_and_unavailable(fake_pm):
    from accelcore.inference.accelerate import resolve_methods

    methods, skipped = resolve_methods(["auto"], fake_pm, set(ZEN3.split()))
    assert methods[0] == "original"
    assert {"fake_fp32", "fake_int8", "fake_any"} <= set(methods)
    assert "fake_bf16" not in methods and "fake_gone" not in methods
    reasons = {c.method: c.reason for c in skipped}
    assert "bf16 is emulated" in reasons["fake_bf16"] and reasons["fake_gone"] == "no lib"


def test_methods_auto_runs_bf16_where_native(fake_pm):
    from accelcore.inference.accelerate import resolve_methods

    methods, skipped = resolve_methods(["auto"], fake_pm, set(SAPPHIRE_RAPIDS.split()))
    assert "fake_bf16" in methods
    assert [c.method for c in skipped if c.method.startswith("fake")] == ["fake_gone"]


def test_an_explicit_list_runs_as_asked(fake_pm):
    from accelcore.inference.accelerate import resolve_methods

    methods, skipped = resolve_methods(["fake_bf16"], fake_pm, set(ZEN3.split()))
    assert methods == ["original", "fake_bf16"] and skipped == []


def _doctor(flags: str, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "fake_backends.py").write_text(FAKE_BACKENDS)
    env = {**os.environ, "ACCELCORE_CPU_FLAGS": flags,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "accelcore.cli", "doctor", "--plugin",
                           "fake_backends", *extra], env=env, capture_output=True, text=True,
                          timeout=300, check=True)


def test_doctor_on_a_faked_avx2_cpu(tmp_path):
    out = _doctor(ZEN3, tmp_path).stdout
    assert "flags faked" in out
    assert "bf16 emulated" in out and "int8 unit: AVX2 (no VNNI)" in out
    assert "train.precision auto -> 32 + channels_last" in out
    assert "skipped fake_bf16: not run by methods: auto: bf16 is emulated" in out
    assert "allocator glibc (tuned)" in out


def test_doctor_json_on_a_faked_amx_cpu(tmp_path):
    report = json.loads(_doctor(SAPPHIRE_RAPIDS, tmp_path, "--json").stdout)
    assert report["machine"]["precision_support"]["bf16"] == "native"
    assert report["engines"] == {"bf16": "AMX", "int8": "AMX"}
    assert report["train_precision_auto"]["precision"] == "bf16"
    assert "fake_bf16" in report["methods_auto"]["run"]
    assert report["runtime"]["allocator"] == "glibc (tuned)"
