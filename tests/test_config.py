"""Recipes: loading, extends, --set overrides, and one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from accelcore.config import Recipe, load_recipe, parse_override, to_dict
from accelcore.errors import RecipeError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_and_types(tmp_path: Path) -> None:
    text = "train:\n  batch_size: 16\n  precision: bf16\n"
    recipe = load_recipe(write(tmp_path / "r.yaml", text))
    assert isinstance(recipe, Recipe)
    assert recipe.name == "r"
    assert recipe.train.batch_size == 16 and recipe.train.precision == "bf16"
    assert recipe.train.momentum == 0.9 and recipe.data.augment.mosaic_scale == [0.5, 1.5]


def test_unquoted_numeric_precision_is_a_string(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path / "r.yaml", "train:\n  precision: 16\n"))
    assert recipe.train.precision == "16"


def test_overrides_parse_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "stages: [train]\n")
    recipe = load_recipe(path, ["stages=[validate, report]", "train.batch_size=8",
                                "accelerate.methods=[original, jit_fp32]", "model.checkpoint=null"])
    assert recipe.stages == ["validate", "report"]
    assert recipe.train.batch_size == 8
    assert recipe.accelerate.methods == ["original", "jit_fp32"]
    assert parse_override("a.b=1.5") == (["a", "b"], 1.5)


def test_extends_merges_and_detects_cycles(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "train:\n  batch_size: 32\n  epochs: 10\nstages: [train]\n")
    child = write(tmp_path / "child.yaml", "extends: base.yaml\ntrain:\n  epochs: 3\n")
    recipe = load_recipe(child)
    assert recipe.train.batch_size == 32 and recipe.train.epochs == 3
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


@pytest.mark.parametrize("text, fragment", [
    ("trian:\n  batch_size: 2\n", "unknown key 'trian' (did you mean 'train'?)"),
    ("train:\n  batch_sise: 2\n", "unknown key 'train.batch_sise' (did you mean 'batch_size'?)"),
    ("train:\n  batch_size: many\n", "train.batch_size: expected int, got 'many'"),
    ("train:\n  nesterov: 3\n", "train.nesterov: expected bool"),
    ("stages: [trian]\n", "stages[0]: unknown stage 'trian' (did you mean 'train'?)"),
    ("accelerate:\n  save: bets\n",
     "accelerate.save: 'bets' is not allowed (did you mean 'best'?)"),
    ("model:\n  checkpoint: /nonexistent/x.pth\n", "model.checkpoint: file not found"),
    ("data:\n  root: /nonexistent/data\n", "data.root: folder not found"),
    ("model:\n  input_size: [416, 400]\n", "model.input_size"),
    ("train:\n  batch_size: 3\n  num_processes: 2\n", "not divisible"),
    ("train: [1, 2]\n", "train: expected a section"),
    ("extends: missing.yaml\n", "extends: file not found"),
    ("train:\n  batch_size: [\n", "invalid YAML"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_bad_recipes_fail_with_one_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert str(path) in message or "bad.yaml" in message or "--set" in message


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_bad_override_syntax(tmp_path: Path) -> None:
    path = write(tmp_path / "r.yaml", "")
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["train.batch_size"])
    with pytest.raises(RecipeError, match="unknown key 'train.bach_size'"):
        load_recipe(path, ["train.bach_size=3"])


def test_to_dict_round_trips(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path / "r.yaml", "train:\n  epochs: 7\n"))
    again = load_recipe(data=to_dict(recipe))
    assert to_dict(again) == to_dict(recipe)


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)  # recipes name files relative to the repository root
    try:
        load_recipe(path)
    except RecipeError as exc:
        # A shipped recipe may point at data that only exists on some machines.
        assert "data.root: folder not found" in str(exc), exc


@pytest.mark.parametrize("key, value, hint", [
    ("model.depth", 0.33, "model.options: {depth: ...}"),
    ("train.use_ipex", True, "train.features: [ipex]"),
])
def test_moved_keys_say_where_they_went(key, value, hint):
    section, name = key.split(".")
    with pytest.raises(RecipeError) as err:
        load_recipe(data={section: {name: value}})
    assert f"'{key}' is no longer a recipe key" in str(err.value) and hint in str(err.value)


def test_recipe_without_model_name_builds_the_declared_default(fresh_plugins):
    from accelcore.build import build_model
    from accelcore.plugins import get_plugin_manager

    recipe = load_recipe(data={"model": {"num_classes": 3}})
    assert recipe.model.name is None
    model = build_model(get_plugin_manager(), recipe)
    assert model.meta["name"] == "yolox_nano" and model.num_classes == 3
