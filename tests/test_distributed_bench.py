"""``accelcore bench train --num-processes``: rows per strategy x process count, every strategy
started through the ``accelcore_launch`` hook (the core imports no strategy)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from accelcore import hookimpl
from accelcore.config import load_recipe
from accelcore.errors import PluginError
from accelcore.interfaces import Declaration
from accelcore.plugins import get_plugin_manager
from accelcore.training.distributed_bench import bench_distributed, default_strategies


class InlineStrategies:
    """A third party's strategies: "inline" runs a world of one rank in this process; "absent"
    is declared but cannot run here."""

    def __init__(self) -> None:
        self.launched: list[tuple[str, int]] = []

    @hookimpl
    def accelcore_declare(self) -> list[Declaration]:
        return [Declaration("strategy", "inline", "one rank in this process"),
                Declaration("strategy", "absent", "needs hardware this machine lacks",
                            available=False, reason="no such interconnect here")]

    @hookimpl
    def accelcore_launch(self, strategy: str, fn: Any, nprocs: int, recipe: Any) -> Any:
        if strategy not in ("inline", "absent"):
            return None
        self.launched.append((strategy, nprocs))
        if nprocs != 1:
            raise PluginError(f"strategy '{strategy}': one process only, got {nprocs}")
        return fn(0, 1)


@pytest.fixture
def pm_with_inline(fresh_plugins):
    pm = get_plugin_manager()  # fresh: its declarations are read on first use, i.e. below
    plugin = InlineStrategies()
    pm.register(plugin, name="inline-strategies")
    return pm, plugin


def tiny_recipe() -> Any:
    return load_recipe(data={
        "name": "tiny-bench",
        "model": {"name": "yolox_nano", "input_size": [64, 64], "num_classes": 8},
        "data": {"num_workers": 0, "synthetic": {"images": 4, "val_images": 2, "size": 64}},
        "train": {"batch_size": 2, "quiet": True},
    })


def test_default_strategies_are_the_declared_ones_but_single(pm_with_inline):
    pm, _ = pm_with_inline
    names = default_strategies(pm)
    assert "single" not in names
    assert {"subprocess", "spawn", "ray", "inline", "absent"} <= set(names)


def test_unknown_strategy_is_one_line_listing_the_declared(pm_with_inline):
    pm, plugin = pm_with_inline
    with pytest.raises(PluginError) as info:
        bench_distributed(pm, tiny_recipe(), ["subprocess", "inlne"], [1], log=lambda _: None)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("--strategies: unknown strategy 'inlne' (did you mean 'inline'?); "
                              "available: ")
    assert "subprocess" in message and "absent" in message
    assert plugin.launched == []  # nothing was started before the names were checked


def test_rows_come_from_the_launch_hook(pm_with_inline):
    pm, plugin = pm_with_inline
    lines: list[str] = []
    rows = bench_distributed(pm, tiny_recipe(), ["inline", "absent"], [1, 2], iters=1, warmup=0,
                             log=lines.append)
    by_key = {(r["strategy"], r["processes"]): r for r in rows}
    ok = by_key[("inline", 1)]
    assert ok["status"] == "ok" and ok["img_per_s"] > 0 and ok["speedup"] == 1.0
    assert ok["threads"] >= 1 and ok["step_ms"] > 0
    assert by_key[("inline", 2)]["status"] == "failed"
    assert by_key[("inline", 2)]["reason"] == "strategy 'inline': one process only, got 2"
    for n in (1, 2):  # declared unavailable: a row with the reason, never launched
        assert by_key[("absent", n)]["status"] == "failed"
        assert by_key[("absent", n)]["reason"] == "no such interconnect here"
    assert plugin.launched == [("inline", 1), ("inline", 2)]
    assert json.dumps(rows)  # rows go to --json as they are


@pytest.mark.slow
def test_bench_command_measures_subprocess_on_one_and_two_processes(tmp_path, capsys,
                                                                    fresh_plugins):
    import yaml

    from accelcore.cli import main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "yolox_nano", "input_size": [64, 64], "num_classes": 8},
        "data": {"num_workers": 0, "synthetic": {"images": 8, "val_images": 2, "size": 64}},
        "train": {"batch_size": 4}}))
    out = tmp_path / "rows.json"
    assert main(["bench", "train", str(recipe), "--num-processes", "1,2", "--strategies",
                 "subprocess", "--iters", "2", "--warmup", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["strategy"], r["processes"], r["status"]) for r in rows] == [
        ("subprocess", 1, "ok"), ("subprocess", 2, "ok")]
    assert rows[1]["img_per_s"] > 0 and rows[1]["speedup"] is not None
    assert "subprocess  2 x 1" in capsys.readouterr().out
