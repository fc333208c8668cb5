"""The command line: --help everywhere, --version, one-line errors with non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from accelcore import __version__
from accelcore.cli import main


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["run"], ["list-plugins"], ["data"], ["data", "synth"],
                                  ["bench"], ["bench", "train"], ["optimize"], ["predict"]])
def test_help_on_every_command(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    assert "usage: accelcore" in capsys.readouterr().out


def test_bad_recipe_is_one_line_error(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  batch_sise: 3\n")
    proc = subprocess.run([sys.executable, "-m", "accelcore", "run", str(recipe)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "unknown key 'train.batch_sise' (did you mean 'batch_size'?)" in lines[0]
    assert "Traceback" not in proc.stderr


def test_unknown_method_is_one_line_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [accelerate]\naccelerate:\n  methods: [openvino_fp23]\n")
    rc = main(["run", str(recipe), "--out", str(tmp_path / "run")])
    assert rc == 2
    assert not (tmp_path / "run").exists()  # checked before any folder is created


def test_out_folder_is_never_overwritten(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("older run")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [report]\nreport:\n  formats: [json]\n")
    rc = main(["run", str(recipe), "--out", str(out)])
    assert rc == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "older run"
