"""Recipes: YAML files validated into typed, nested dataclasses.

A recipe is loaded safely (``yaml.safe_load``), may ``extends:`` another recipe (paths relative
to the recipe), takes ``--set a.b=c`` overrides (values parsed as YAML), and is validated field
by field. Every problem raises :class:`~accelcore.errors.RecipeError` with one line naming the
file, the key path, the bad value and the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from accelcore.errors import RecipeError

STAGES = ("train", "accelerate", "validate", "report")


@dataclass
class ModelConfig:
    # None: the model the installed model plugins mark as their default.
    name: str | None = None
    num_classes: int = 80
    checkpoint: str | None = None
    # Start a fine-tune from a checkpoint with another class count: drop its class-pred tensors.
    finetune: bool = False
    # Plugin-owned model options, read by the model's plugin only (e.g. depth/width).
    options: dict = field(default_factory=dict)
    # [H, W]; None = the model's default (416 for nano/tiny, 640 otherwise).
    input_size: list[int] | None = None


@dataclass
class SyntheticConfig:
    images: int = 512
    val_images: int = 64
    size: int = 416
    seed: int = 0
    num_classes: int = 8
    cache_dir: str | None = None


@dataclass
class AugmentConfig:
    """YOLOX augmentation knobs (names as in YOLOX's Exp); defaults are yolox_nano's."""

    mosaic_prob: float = 0.5
    mixup_prob: float = 1.0
    hsv_prob: float = 1.0
    flip_prob: float = 0.5
    degrees: float = 10.0
    translate: float = 0.1
    mosaic_scale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    mixup_scale: list[float] = field(default_factory=lambda: [0.5, 1.5])
    shear: float = 2.0
    enable_mixup: bool = False
    multiscale_range: int = 3
    multiscale_interval: int = 10
    max_labels: int = 50


@dataclass
class DataConfig:
    # None: the built-in synthetic dataset (offline, no download).
    root: str | None = None
    train: str = "train2017"
    val: str = "val2017"
    train_json: str = "instances_train2017.json"
    val_json: str = "instances_val2017.json"
    # Decoded images kept in RAM: "auto" when they take at most a fifth of the available memory
    # (each training process holds its own copy; forked loader workers share it).
    cache: bool | Literal["auto"] = "auto"
    num_workers: int = 2
    # A training image that cannot be read: "fail" stops with its name; "skip" logs it once and
    # uses the next readable image in its place (accelcore.data.mosaic.MosaicDetection).
    on_bad_image: Literal["skip", "fail"] = "fail"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainConfig:
    strategy: str = "single"
    num_processes: int = 1
    # "auto" (the shipped recipes use it): bf16 + channels_last where the CPU has bf16
    # hardware, else fp32 + channels_last. The bare default stays fp32 so a recipe that names
    # nothing trains the same numbers on every machine.
    precision: str = "32"
    channels_last: bool = False
    compile: bool = False
    # Training-time features provided by plugins (declaration kind "feature"), e.g. [ipex].
    features: list[str] = field(default_factory=list)
    batch_size: int = 64
    epochs: int = 300
    warmup_epochs: int = 5
    warmup_lr: float = 0.0
    basic_lr_per_img: float = 0.01 / 64.0
    min_lr_ratio: float = 0.05
    scheduler: Literal["quadwarm_cos_flat", "warmcos", "constant"] = "quadwarm_cos_flat"
    no_aug_epochs: int = 15
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    ema: bool = True
    ema_decay: float = 0.9998
    eval_interval: int = 10
    # Cap on total iterations for smoke tests; the schedule keeps the shape of the full run.
    max_iters: int | None = None
    seed: int = 0
    threads: int | None = None
    print_interval: int = 10
    quiet: bool = False
    # Also save checkpoints/last.pth every N iterations (0: only at the end of each epoch).
    checkpoint_interval: int = 0
    # glibc mallopt tuning (no mmap for big blocks, no trimming): avoids page-fault storms.
    malloc_tuning: bool = True
    # Allocator LD_PRELOADed: into the workers (subprocess/spawn/ray strategies), or by
    # restarting the CLI process (single).
    allocator: Literal["default", "jemalloc", "tcmalloc"] = "default"
    # Plugin-owned options, keyed by the strategy's or feature's name, e.g.
    # {ray: {address: auto, cpus_per_worker: 1}}; the core passes them on unread.
    options: dict[str, dict] = field(default_factory=dict)


@dataclass
class AccuracyCriterion:
    metric: Literal["ap50_95", "ap50"] = "ap50_95"
    kind: Literal["absolute", "relative"] = "absolute"
    # Absolute: AP points (0-100 scale); relative: fraction of the original's AP.
    max_drop: float = 1.0


@dataclass
class LatencyConfig:
    warmup: int = 2
    min_runs: int = 5
    min_seconds: float = 10.0


@dataclass
class AccelerateConfig:
    methods: list[str] = field(default_factory=lambda: ["original"])
    batch_size: int = 64
    calibration_images: int = 128
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    accuracy_criterion: AccuracyCriterion = field(default_factory=AccuracyCriterion)
    save: Literal["best", "all", "none"] = "best"
    threads: int | None = None
    # Run each method in a fresh process (clean allocator, threads, compiler caches; a crash
    # becomes a "failed" row instead of ending the run).
    isolate: bool = True
    # Per-method backend options, e.g. {openvino_int8: {async: true, streams: 2}}.
    options: dict[str, dict] = field(default_factory=dict)
    # Plain-runtime rows measured beside the methods in the same run ("auto": every declared
    # reference that can run here; [] for none). The report's `lead` compares against them.
    references: list[str] = field(default_factory=lambda: ["auto"])


@dataclass
class ValidateConfig:
    conf_thre: float = 0.001
    nms_thre: float = 0.65
    batch_size: int = 16
    max_images: int | None = None


@dataclass
class ReportConfig:
    formats: list[str] = field(default_factory=lambda: ["md", "json", "png"])


@dataclass
class Recipe:
    name: str = "recipe"
    stages: list[str] = field(default_factory=lambda: ["train"])
    # Extra plugin modules to load (``--plugin module.path`` does the same).
    plugins: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    accelerate: AccelerateConfig = field(default_factory=AccelerateConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # Where the recipe came from (not a YAML key): used in messages and run names.
    source: str = field(default="<dict>", metadata={"internal": True})


# ---------------------------------------------------------------- loading and merging


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def deep_merge(base: dict, override: dict) -> dict:
    """Merge ``override`` into a copy of ``base``; nested mappings merge, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a recipe file and resolve its ``extends:`` chain into one mapping."""
    path = Path(path).resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise RecipeError(f"{path}: extends: cycle: {cycle}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: expected a recipe path, got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if not parent_path.is_file():
        raise RecipeError(f"{path}: extends: file not found: {parent_path}")
    return deep_merge(load_raw(parent_path, (*_chain, path)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.batch_size=16"`` → (["train", "batch_size"], 16); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. train.batch_size=16")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return [part for part in key.strip().split(".")], parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                path = ".".join(keys[: depth + 1])
                raise RecipeError(f"--set {text}: {path} is not a section")
            node[key] = child = dict(child)
            node = child
        node[keys[-1]] = value
    return data


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> Recipe:
    """Load, merge, override and validate a recipe into a :class:`Recipe`."""
    source = str(path) if path is not None else "<dict>"
    raw = load_raw(path) if path is not None else dict(data or {})
    raw = apply_overrides(raw, overrides or [])
    recipe = from_dict(Recipe, raw, source=source)
    recipe.source = source
    if path is not None and "name" not in raw:
        recipe.name = Path(path).stem
    _check_semantics(recipe)
    return recipe


# ---------------------------------------------------------------- validation


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where, source)
            except RecipeError:
                continue
        raise RecipeError(f"{source}: {where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            hint = _suggest(str(value), [str(a) for a in allowed])
            raise RecipeError(
                f"{source}: {where}: {value!r} is not allowed{hint}; "
                f"allowed: {', '.join(map(str, allowed))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {where}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(key_tp, k, f"{where}", source):
                _coerce(value_tp, v, f"{where}.{k}", source) for k, v in value.items()}
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise RecipeError(f"{source}: {where}: expected a mapping, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise RecipeError(f"{source}: {where}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(inner, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{source}: {where}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, source=source, prefix=where + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        # Unquoted YAML numbers for names like precision: 32 / 16 are meant as strings.
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is Any:
        return value
    raise RecipeError(f"{source}: {where}: expected {_type_name(tp)}, got {value!r}")


#: Keys that were renamed or moved into a plugin's options: key path -> what to write instead.
MOVED_KEYS = {
    **{f"model.{key}": f"model.options: {{{key}: ...}} (read by the model's plugin)"
       for key in ("depth", "width", "depthwise")},
    "train.use_ipex": "train.features: [ipex] (training-time features are plugin-declared)",
    "ray": "train.options: {ray: {address: ..., cpus_per_worker: ...}} (options belong to the "
           "ray strategy plugin)",
}


def from_dict(cls: type, data: dict, source: str = "<dict>", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        moved = MOVED_KEYS.get(f"{prefix}{key}")
        if moved is not None and key not in fields:
            raise RecipeError(f"{source}: '{prefix}{key}' is no longer a recipe key; "
                              f"use {moved}")
        if key not in fields:
            hint = _suggest(str(key), list(fields))
            raise RecipeError(
                f"{source}: unknown key '{prefix}{key}'{hint}; "
                f"allowed in {prefix.rstrip('.') or 'the recipe'}: {', '.join(fields)}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}", source)
    return cls(**kwargs)


def _check_semantics(recipe: Recipe) -> None:
    src = recipe.source
    for i, stage in enumerate(recipe.stages):
        if stage not in STAGES:
            hint = _suggest(stage, list(STAGES))
            raise RecipeError(f"{src}: stages[{i}]: unknown stage '{stage}'{hint}; "
                              f"allowed: {', '.join(STAGES)}")
    positive = {
        "train.batch_size": recipe.train.batch_size,
        "train.num_processes": recipe.train.num_processes,
        "accelerate.batch_size": recipe.accelerate.batch_size,
        "validate.batch_size": recipe.validate.batch_size,
        "model.num_classes": recipe.model.num_classes,
    }
    for key, value in positive.items():
        if value < 1:
            raise RecipeError(f"{src}: {key}: must be >= 1, got {value}")
    if recipe.train.max_iters is not None and recipe.train.max_iters < 1:
        raise RecipeError(
            f"{src}: train.max_iters: must be >= 1 or null, got {recipe.train.max_iters}")
    size = recipe.model.input_size
    if size is not None and (len(size) != 2 or any(s % 32 or s <= 0 for s in size)):
        raise RecipeError(f"{src}: model.input_size: expected [H, W], multiples of 32, got {size}")
    if recipe.train.batch_size % recipe.train.num_processes:
        raise RecipeError(
            f"{src}: train.batch_size: {recipe.train.batch_size} is not divisible by "
            f"train.num_processes={recipe.train.num_processes}")
    if recipe.model.checkpoint is not None and not Path(recipe.model.checkpoint).is_file():
        raise RecipeError(f"{src}: model.checkpoint: file not found: {recipe.model.checkpoint}")
    if recipe.data.root is not None:
        root = Path(recipe.data.root)
        if not root.is_dir():
            raise RecipeError(f"{src}: data.root: folder not found: {root}")


def to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data (written into every run folder)."""
    out = dataclasses.asdict(recipe)
    out.pop("source", None)
    return out
