"""A strategy from a third-party plugin is used by ``accelcore run`` with no change to the core:
a module with ``accelcore_declare`` + ``accelcore_launch``, loaded by ``--plugin`` or by the
recipe's ``plugins:`` list."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from accelcore.cli import main

# The plugin a third party would ship: it runs each rank in turn in this process (a world of
# nprocs ranks without any process group: enough for one rank) and records what it was given.
PLUGIN_SOURCE = '''
import json
from pathlib import Path

from accelcore import hookimpl
from accelcore.interfaces import Declaration

NAME = "acme_inline"


@hookimpl
def accelcore_declare():
    return [Declaration("strategy", NAME, "every rank in turn, in this process")]


@hookimpl
def accelcore_launch(strategy, fn, nprocs, recipe):
    if strategy != NAME:
        return None
    options = recipe.train.options.get(NAME, {})
    results = [fn(rank, nprocs) for rank in range(nprocs)]
    Path(options["record"]).write_text(json.dumps({
        "nprocs": nprocs, "label": options["label"], "ranks": len(results)}))
    return results[0]
'''


@pytest.fixture
def acme_plugin(tmp_path, monkeypatch, fresh_plugins):
    """The plugin module on sys.path under a name no other test uses; forgotten afterwards."""
    folder = tmp_path / "third_party"
    folder.mkdir()
    (folder / "acme_strategy_plugin.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    monkeypatch.syspath_prepend(str(folder))
    yield "acme_strategy_plugin"
    sys.modules.pop("acme_strategy_plugin", None)


@pytest.mark.parametrize("loaded_by", ["--plugin", "recipe plugins:"])
def test_third_party_strategy_trains_through_accelcore_run(acme_plugin, loaded_by, tmp_path,
                                                           capsys):
    record = tmp_path / "launched.json"
    recipe = {
        "name": "acme", "stages": ["train"],
        "model": {"name": "yolox_nano", "input_size": [64, 64], "num_classes": 8},
        "data": {"num_workers": 0, "synthetic": {"images": 4, "val_images": 2, "size": 64}},
        "train": {"strategy": "acme_inline", "num_processes": 1, "batch_size": 2,
                  "max_iters": 1, "epochs": 1, "warmup_epochs": 0, "no_aug_epochs": 0,
                  "quiet": True, "options": {"acme_inline": {"record": str(record),
                                                            "label": "from the recipe"}}},
    }
    args = []
    if loaded_by == "--plugin":
        args = ["--plugin", acme_plugin]
    else:
        recipe["plugins"] = [acme_plugin]
    path = tmp_path / "acme.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"

    assert main(["run", str(path), "--out", str(out), *args]) == 0, capsys.readouterr().err

    launched = json.loads(record.read_text())
    assert launched["nprocs"] == 1 and launched["ranks"] == 1
    assert launched["label"] == "from the recipe"  # train.options.<name> reached the plugin
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["iterations"] == 1 and results["train"]["world_size"] == 1
    # What the plugin returned (rank 0's result of fn, the core's loop) is the stage's summary.
    assert json.loads((out / "train_summary.json").read_text())["iterations"] == 1
    assert Path(results["train"]["last_checkpoint"]).is_file()


def test_unloaded_third_party_strategy_is_a_one_line_error(tmp_path, capsys, fresh_plugins):
    path = tmp_path / "acme.yaml"
    path.write_text(yaml.safe_dump({"stages": ["train"],
                                    "train": {"strategy": "acme_inline"}}))
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith("accelcore: error: train.strategy: unknown strategy 'acme_inline'")
    assert "subprocess" in err  # lists the declared ones
