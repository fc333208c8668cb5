"""``accelcore bench train``: parser wiring and input validation (the timing itself is the
lead's benchmark; a real 1-iteration run is covered as slow)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from accelcore.commands import bench
from accelcore.config import load_recipe
from accelcore.errors import RecipeError
from accelcore.training.bench import (
    CONFIG_ENV,
    CONFIGS,
    PAIRED_BLOCK,
    _environment,
    _pool_rounds,
    _time_paired,
    _variant,
    bench_train,
    config_overrides,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command"))
    return parser


def test_bench_train_arguments():
    args = _parser().parse_args(["bench", "train", "r.yaml", "--configs", "fp32,bf16_cl",
                                 "--modes", "compute", "--iters", "4", "--json", "o.json"])
    assert args.configs == ["fp32", "bf16_cl"] and args.modes == ["compute"]
    assert args.iters == 4 and args.json_path == "o.json" and args.handler is bench.handle_train


def test_unknown_config_is_a_recipe_error():
    with pytest.raises(RecipeError, match="unknown config 'fp8'"):
        bench_train(load_recipe(data={}), ["fp8"], ["compute"])
    with pytest.raises(RecipeError, match=r"unknown config 'bf16_cl\+'"):
        bench_train(load_recipe(data={}), ["bf16_cl+"], ["compute"])
    with pytest.raises(RecipeError, match="unknown mode"):
        bench_train(load_recipe(data={}), ["fp32"], ["both"])


def test_configs_pin_every_knob_whatever_the_recipe_says():
    # The main recipe trains channels_last; the fp32 baseline row must still be NCHW eager.
    recipe = load_recipe(data={"train": {"channels_last": True, "compile": True,
                                         "precision": "bf16", "features": ["ipex"]}})
    fp32 = _variant(recipe, config_overrides("fp32")).train
    assert (fp32.precision, fp32.channels_last, fp32.compile, fp32.features) == (
        "32", False, False, [])
    with_feature = _variant(recipe, config_overrides("bf16_cl+ipex")).train
    assert (with_feature.precision, with_feature.channels_last, with_feature.features) == (
        "bf16", True, ["ipex"])
    cl_compile = _variant(recipe, CONFIGS["fp32_cl_compile"]).train
    assert (cl_compile.precision, cl_compile.channels_last, cl_compile.compile) == (
        "32", True, True)
    # No two configurations are the same run (overrides and environment together).
    runs = {(frozenset(c.items()), frozenset(CONFIG_ENV.get(n, {}).items()))
            for n, c in CONFIGS.items()}
    assert len(runs) == len(CONFIGS)


def test_torch_ops_config_switches_the_lean_step_off_only_while_it_runs(monkeypatch):
    from accelcore.training import bn_silu, lean_step, native

    monkeypatch.delenv(lean_step.SWITCH_ENV, raising=False)
    with _environment("fp32_cl_torch+ipex"):
        assert not lean_step.enabled() and not native.switched_on(bn_silu.SWITCH_ENV)
    assert lean_step.enabled() and native.switched_on(bn_silu.SWITCH_ENV)
    monkeypatch.setenv(lean_step.SWITCH_ENV, "1")
    with _environment("fp32_cl"):
        assert native.switched_on(bn_silu.SWITCH_ENV)
    with _environment("fp32_cl_torch"):
        assert not native.switched_on(bn_silu.SWITCH_ENV)
    assert native.switched_on(bn_silu.SWITCH_ENV)


def test_rounds_pool_step_times_and_keep_failures():
    def row(config: str, times: list[float], status: str = "ok") -> dict:
        return {"config": config, "mode": "compute", "status": status, "batch": 4,
                "img_per_s": 4 / sorted(times)[len(times) // 2] if times else None,
                "step_s": times, "reason": "" if status == "ok" else "died"}

    first = [row("a", [1.0, 1.0, 1.0]), row("b", [2.0, 2.0, 2.0])]
    second = [row("a", [3.0, 3.0]), row("b", [], status="failed")]
    a, b = _pool_rounds([first, second])
    # pooled median of 1,1,1,3,3 is 1.0 s -> 4 img/s; each round's own figure is kept
    assert a["img_per_s"] == pytest.approx(4.0) and a["step_ms"] == pytest.approx(1000.0)
    assert a["round_img_per_s"] == pytest.approx([4.0, 4 / 3])
    assert b["status"] == "failed" and b["reason"] == "died"
    with pytest.raises(RecipeError, match="--rounds must be >= 1"):
        bench_train(load_recipe(data={}), ["fp32"], ["compute"], rounds=0)


def test_both_modes_alternate_in_blocks_with_the_workers_stopped_for_compute():
    import contextlib
    import types

    events = []

    class Loader:
        paused = False

        def set_epoch(self, epoch):
            pass

        def __iter__(self):
            return iter([("batch", "targets")] * 100)

        @contextlib.contextmanager
        def workers_paused(self):
            self.paused = True
            yield
            self.paused = False

    loader = Loader()

    def train_one_iter(images, targets, multiscale):
        mode = "e2e" if multiscale else "compute"
        assert (images == "batch") == multiscale and loader.paused == (mode == "compute")
        events.append((mode, trainer.state.iteration))

    trainer = types.SimpleNamespace(state=types.SimpleNamespace(iteration=None),
                                    train_one_iter=train_one_iter)
    times = _time_paired(trainer, iters=5, warmup=1, fixed=("fixed", "targets"), loader=loader)
    assert len(times["compute"]) == len(times["e2e"]) == 5
    modes = [mode for mode, _ in events]
    b = PAIRED_BLOCK
    assert modes == ["compute", "e2e"] + (["compute"] * b + ["e2e"] * b) * (5 // b) + [
        "compute", "e2e"] * (5 % b)
    # each mode follows its own iteration count (lr, multiscale schedule) from 0
    for mode in ("compute", "e2e"):
        assert [it for m, it in events if m == mode] == list(range(6))


def test_ratios_against_a_chosen_baseline_also_per_round(monkeypatch):
    """--baseline picks the reference row; with rounds, each round's ratio pairs the two
    configurations measured back to back (the host's drift between rounds cancels)."""
    from accelcore.training import bench as bench_module

    step_s = {"ref": [[2.0], [4.0]], "fast": [[1.0], [2.5]]}  # per round, seconds per step
    calls: dict[str, int] = {}

    def fake(recipe, name, modes, iters, warmup, tmp):
        k = calls[name] = calls.get(name, -1) + 1
        times = step_s[name][k]
        return [{"config": name, "mode": "compute", "status": "ok", "reason": "", "batch": 8,
                 "step_s": times, "img_per_s": 8 / times[0], "speedup": None}]

    monkeypatch.setattr(bench_module, "_run_isolated", fake)
    monkeypatch.setattr(bench_module, "config_overrides", lambda name: {})  # names are fakes
    with pytest.raises(RecipeError, match="--baseline stock: not among the measured configs"):
        bench_train(load_recipe(data={}), ["fast"], ["compute"], baseline="stock")
    rows = bench_train(load_recipe(data={}), ["ref", "fast"], ["compute"], rounds=2,
                       baseline="ref", log=lambda *_: None)
    by = {r["config"]: r for r in rows}
    assert by["fast"]["baseline"] == "ref" and by["ref"]["speedup"] == pytest.approx(1.0)
    # pooled medians: ref 3.0 s, fast 1.75 s; by round 2.0 / 1.0 and 4.0 / 2.5
    assert by["fast"]["speedup"] == pytest.approx(3.0 / 1.75)
    assert by["fast"]["round_speedup"] == pytest.approx([2.0, 1.6])


@pytest.mark.slow
def test_bench_train_runs_and_writes_json(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {name: yolox_nano, num_classes: 3, input_size: [128, 128]}\n"
        "data: {num_workers: 0, synthetic: {images: 8, val_images: 2, size: 128, "
        f"num_classes: 3, cache_dir: {tmp_path / 'syn'}}}}}\n"
        "train: {batch_size: 2, threads: 1}\n")
    out = tmp_path / "b.json"
    args = _parser().parse_args(["bench", "train", str(recipe), "--configs",
                                 "fp32,fp32_cl,bf16_cl+ipex", "--rounds", "2",
                                 "--iters", "1", "--warmup", "1", "--json", str(out)])
    assert args.handler(args) == 0
    rows = json.loads(out.read_text())
    assert {(r["config"], r["mode"]) for r in rows} == {
        (c, m) for c in ("fp32", "fp32_cl", "bf16_cl+ipex") for m in ("compute", "e2e")}
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["img_per_s"] > 0 and len(r["round_img_per_s"]) == 2 for r in ok)
    assert all(r["speedup"] == pytest.approx(1.0) for r in ok if r["config"] == "fp32")
    if importlib.util.find_spec("intel_extension_for_pytorch") is None:  # the main environment
        with_feature = [r for r in rows if r["config"] == "bf16_cl+ipex"]
        assert all(r["status"] == "unavailable" and "train.features[0]: feature 'ipex'"
                   in r["reason"] for r in with_feature)


@pytest.mark.slow
def test_stock_and_auto_rows_run_in_their_own_processes(tmp_path: Path):
    """`stock` runs untuned in its own process, `auto` resolves per CPU, `fp32_cl_torch` runs
    without the training kernels, ratios are vs stock."""
    from accelcore.machine import has_native

    recipe = load_recipe(data={
        "model": {"num_classes": 3, "input_size": [64, 64]},
        "data": {"num_workers": 0, "synthetic": {"images": 4, "val_images": 2, "size": 64,
                                                 "num_classes": 3,
                                                 "cache_dir": str(tmp_path / "syn")}},
        "train": {"batch_size": 2}})
    rows = bench_train(recipe, ["stock", "fp32", "auto", "fp32_cl_torch"], ["compute"], iters=1,
                       warmup=0)
    by = {r["config"]: r for r in rows}
    assert all(r["status"] == "ok" and r["baseline"] == "stock" for r in rows), rows
    assert by["stock"]["runtime"].startswith("glibc (stock)")
    assert by["fp32"]["runtime"].startswith("glibc (tuned)")
    assert by["stock"]["speedup"] == pytest.approx(1.0)
    assert by["auto"]["precision"] == ("bf16 + channels_last" if has_native("bf16")
                                       else "32 + channels_last")
    assert by["stock"]["precision"] == "32"
    # the torch-ops reference ran with the lean step off in its process, every other row with it
    assert [r["config"] for r in rows if not r["lean_step"]] == ["fp32_cl_torch"]
    assert by["fp32_cl_torch"]["precision"] == "32 + channels_last"
