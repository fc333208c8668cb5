"""Training throughput benchmark: several configurations side by side in one process.

Every configuration is the real training step of ``accelcore.training.loop.Trainer`` (same
precision plugin, layout, optimizer, EMA) with a fresh model from the same seed. Two modes:

* ``compute``: one preloaded batch at the recipe's input size, repeated — the step alone;
* ``e2e``: the real loader (mosaic, mixup, HSV, flip) and multiscale resizing, as in training.

Both modes are measured side by side: alternating blocks of :data:`PAIRED_BLOCK` steps, the
loader's workers stopped during the compute blocks (:func:`_time_paired`).

A configuration is a name from :data:`CONFIGS`, optionally followed by plugin-declared training
features (``train.features``): ``bf16_cl+NAME`` is ``bf16_cl`` with feature ``NAME`` on.
``stock`` is what a user has before accelcore: fp32 eager NCHW with no allocator tuning and
torch's default threads. ``fp32_cl_torch`` is tuned fp32 + channels_last with torch's own ops
(this package's training kernels switched off): the lean step's reference. ``auto`` is
``train.precision: auto`` (bf16 + channels_last where the CPU has bf16 hardware, fp32 +
channels_last elsewhere). Ratios are taken against ``stock`` when it ran, else against
``fp32``.

Each configuration runs in its own process by default (``isolate``): the allocator's heap,
autocast caches and compiled code of one configuration never colour the next, and ``stock``
really starts untuned (glibc's tuning variables only act from a process's start).

Throughput is the median over the timed iterations after ``warmup`` untimed ones. With
``rounds`` > 1 the whole list of configurations is measured that many times, interleaved
(A B C A B C …), and each row pools the step times of all its rounds: on a shared machine whose
speed drifts over minutes, every configuration then samples the same stretches of time, so
their ratios are not an artefact of when each ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from accelcore.errors import AccelcoreError, RecipeError, one_line
from accelcore.interfaces import TrainJob
from accelcore.runtime import RuntimeSetup, describe_runtime, environment, runtime_label
from accelcore.training import lean_step
from accelcore.training.loop import Trainer

#: Every knob a configuration can turn, at its plain value: each configuration sets all of them
#: (``train.features`` too, see :func:`config_overrides`), so a recipe's own choice (the main
#: recipe trains channels_last) never leaks into a row — ``fp32`` is fp32 eager NCHW, the
#: baseline every ratio is taken against.
_PLAIN: dict[str, Any] = {"precision": "32", "channels_last": False, "compile": False}


def _config(**overrides: Any) -> dict[str, Any]:
    return {**_PLAIN, **overrides}


#: name -> TrainConfig overrides
CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": _config(),
    "fp32_cl": _config(channels_last=True),
    "fp64": _config(precision="64"),
    "fp16": _config(precision="16"),
    "bf16": _config(precision="bf16"),
    "bf16_cl": _config(precision="bf16", channels_last=True),
    "bf16_cl_compile": _config(precision="bf16", channels_last=True, compile=True),
    "fp32_compile": _config(compile=True),
    "fp32_cl_compile": _config(channels_last=True, compile=True),
    "stock": _config(malloc_tuning=False, allocator="default", threads=None),
    "auto": _config(precision="auto"),
    "fp32_cl_torch": _config(channels_last=True),
}
#: name -> environment the configuration runs under (set in its process, or around it when the
#: configurations share one): ``fp32_cl_torch`` is fp32 + channels_last, allocator and threads
#: tuned, with torch's own ops — the lean step switched off — the lean step's reference.
CONFIG_ENV: dict[str, dict[str, str]] = {
    "fp32_cl_torch": {lean_step.SWITCH_ENV: "0"},
}
DEFAULT_CONFIGS = ("stock", "fp32", "fp32_cl_torch", "fp32_cl", "bf16_cl", "auto")
FEATURE_SEPARATOR = "+"
MODES = ("compute", "e2e")
#: Steps per block when both modes are measured: they alternate in blocks this long.
PAIRED_BLOCK = 2
PHASES = ("data", "forward", "loss", "backward", "optimizer", "ema")


def config_overrides(name: str) -> dict[str, Any]:
    """The ``TrainConfig`` overrides of configuration ``name`` (``CONFIG[+FEATURE…]``)."""
    base, *features = name.split(FEATURE_SEPARATOR)
    if base not in CONFIGS or not all(features):
        raise RecipeError(f"--configs: unknown config '{name}'; known: {', '.join(CONFIGS)}, "
                          f"each optionally with training features: CONFIG+FEATURE")
    return {**CONFIGS[base], "features": features}


def _environment(name: str) -> contextlib.AbstractContextManager[None]:
    """Configuration ``name``'s :data:`CONFIG_ENV` set for the block, then restored."""
    return environment(CONFIG_ENV.get(name.split(FEATURE_SEPARATOR)[0], {}))


def _variant(recipe: Any, overrides: dict[str, Any]) -> Any:
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, **overrides))


def _batches(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches from epoch 0 on (same sequence for every configuration)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _trainer(recipe: Any, overrides: dict[str, Any], loader: Any, pm: Any,
             work_dir: Path) -> Trainer:
    t = Trainer(TrainJob(_variant(recipe, overrides), work_dir), write=False)
    t.pm = pm
    t.setup_data(loader=loader)
    t.setup_model()
    t.wrap_model()
    return t


def _time_steps(t: Trainer, mode: str, iters: int, warmup: int,
                fixed: tuple[torch.Tensor, torch.Tensor], loader: Any) -> list[float]:
    t.state.iteration = 0  # same lr and multiscale sequence for every configuration
    source = _batches(loader) if mode == "e2e" else None
    times = []
    for k in range(warmup + iters):
        seconds = _timed_step(t, source, fixed)
        t.state.iteration += 1
        if k >= warmup:
            times.append(seconds)
    return times


def _timed_step(t: Trainer, source: Iterator[tuple[torch.Tensor, torch.Tensor]] | None,
                fixed: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Seconds of one training step: on the loader's next batch (``source``), multiscale as in
    training, or without a source on the fixed batch."""
    t0 = time.perf_counter()
    if source is not None:
        images, targets = next(source)
        t.train_one_iter(images, targets, multiscale=True)
    else:
        t.train_one_iter(*fixed, multiscale=False)
    return time.perf_counter() - t0


def _time_paired(t: Trainer, iters: int, warmup: int, fixed: tuple[torch.Tensor, torch.Tensor],
                 loader: Any) -> dict[str, list[float]]:
    """Both modes' step times, measured in alternating blocks of :data:`PAIRED_BLOCK` steps (after
    ``warmup`` steps of each), the loader's workers stopped during the compute blocks.

    A shared host's speed drifts 20-45% within a minute; steps of both modes taken seconds apart
    see the same drift, so their ratio does not depend on which mode ran in a fast stretch.
    Stopped, the workers take nothing from the compute steps, and the end-to-end steps find the
    loader exactly as the previous end-to-end block left it: as in one continuous run.
    """
    source = _batches(loader)
    done = {"compute": 0, "e2e": 0}
    times: dict[str, list[float]] = {"compute": [], "e2e": []}

    def block(mode: str, steps: int, timed: bool) -> None:
        for _ in range(steps):
            t.state.iteration = done[mode]  # each mode's own lr and multiscale sequence
            seconds = _timed_step(t, source if mode == "e2e" else None, fixed)
            if timed:
                times[mode].append(seconds)
            done[mode] += 1

    with loader.workers_paused():
        block("compute", warmup, timed=False)
    block("e2e", warmup, timed=False)
    while len(times["e2e"]) < iters:
        steps = min(PAIRED_BLOCK, iters - len(times["e2e"]))
        with loader.workers_paused():
            block("compute", steps, timed=True)
        block("e2e", steps, timed=True)
    return times


def _check_args(configs: list[str] | tuple[str, ...], modes: list[str] | tuple[str, ...],
                iters: int, warmup: int) -> None:
    for name in configs:
        config_overrides(name)
    for mode in modes:
        if mode not in MODES:
            raise RecipeError(f"--modes: unknown mode '{mode}'; known: {', '.join(MODES)}")
    if iters < 1 or warmup < 0:
        raise RecipeError(f"--iters must be >= 1 and --warmup >= 0, got {iters}, {warmup}")


def _bench_configs(recipe: Any, configs: list[str] | tuple[str, ...],
                   modes: list[str] | tuple[str, ...], iters: int, warmup: int,
                   log: Any) -> list[dict[str, Any]]:
    """Rows of ``configs`` measured one after the other in this process."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="accelcore-bench-") as tmp:
        work = Path(tmp)
        base = Trainer(TrainJob(recipe, work), write=False)
        base.setup_runtime()
        base.setup_data()
        loader = base.loader
        fixed = next(_batches(loader))
        for name in configs:
            with _environment(name):
                rows += _config_rows(recipe, name, modes, iters, warmup, fixed, loader, base.pm,
                                     work, log)
    return rows


def _config_rows(recipe: Any, name: str, modes: list[str] | tuple[str, ...], iters: int,
                 warmup: int, fixed: tuple[torch.Tensor, torch.Tensor], loader: Any, pm: Any,
                 work: Path, log: Any) -> list[dict[str, Any]]:
    """Configuration ``name``'s rows, one per mode (``unavailable`` ones if it cannot be built)."""
    try:
        t = _trainer(recipe, config_overrides(name), loader, pm, work)
    except AccelcoreError as exc:
        log(f"  {name}: unavailable: {exc}")
        return [{"config": name, "mode": mode, "img_per_s": None, "speedup": None,
                 "step_ms": None, "status": "unavailable", "reason": str(exc)} for mode in modes]
    chosen = f"{t.cfg.precision}{' + channels_last' if t.cfg.channels_last else ''}"
    batch = int(fixed[0].shape[0])
    rows = []
    if set(modes) == set(MODES) and hasattr(loader, "workers_paused"):
        paired = _time_paired(t, iters, warmup, fixed, loader)
    else:
        paired = {}
    for mode in modes:
        times = paired.get(mode) or _time_steps(t, mode, iters, warmup, fixed, loader)
        med = statistics.median(times)
        rows.append({"config": name, "mode": mode, "img_per_s": batch / med, "speedup": None,
                     "step_ms": 1000 * med, "status": "ok", "reason": "", "precision": chosen,
                     "lean_step": lean_step.enabled(),
                     "runtime": runtime_label(describe_runtime()), "batch": batch,
                     "step_s": times})
        log(f"  {name:<16} {mode:<8} {batch / med:8.2f} img/s  "
            f"(median step {1000 * med:.0f} ms over {iters}; {chosen})")
    return rows


def _child(recipe: Any, name: str, modes: list[str], iters: int, warmup: int,
           result: str) -> None:
    """One configuration's process: apply the setup the parent exported, measure, report."""
    import json

    from accelcore.runtime import apply_inherited_setup

    apply_inherited_setup()
    try:
        rows = _bench_configs(recipe, [name], modes, iters, warmup, log=print)
    except BaseException as exc:  # noqa: BLE001 - any failure becomes the rows' reason
        rows = [{"config": name, "mode": mode, "img_per_s": None, "speedup": None,
                 "step_ms": None, "status": "failed", "reason": one_line(exc)}
                for mode in modes]
    Path(result).write_text(json.dumps(rows))


def _run_isolated(recipe: Any, name: str, modes: list[str], iters: int, warmup: int,
                  work: Path) -> list[dict[str, Any]]:
    import json
    import multiprocessing

    variant = _variant(recipe, config_overrides(name))
    setup = RuntimeSetup.from_recipe(variant)
    result = work / f"{name}.json"
    proc = multiprocessing.get_context("spawn").Process(
        target=_child, args=(variant, name, list(modes), iters, warmup, str(result)))
    with setup.exported(), _environment(name):
        proc.start()
    proc.join()
    if result.is_file():
        return json.loads(result.read_text())
    return [{"config": name, "mode": mode, "img_per_s": None, "speedup": None, "step_ms": None,
             "status": "failed", "reason": f"process died (exit code {proc.exitcode})"}
            for mode in modes]


def _pool_rounds(per_round: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (config, mode): the step times of every round pooled into one median, the
    rounds' own img/s kept in ``round_img_per_s``. A row failed in any round stays failed."""
    pooled = []
    for rows in zip(*per_round, strict=True):
        failed = next((r for r in rows if r["status"] != "ok"), None)
        if failed is not None:
            pooled.append(failed)
            continue
        times = [t for r in rows for t in r["step_s"]]
        med = statistics.median(times)
        pooled.append({**rows[0], "img_per_s": rows[0]["batch"] / med, "step_ms": 1000 * med,
                       "step_s": times, "round_img_per_s": [r["img_per_s"] for r in rows]})
    return pooled


def bench_train(recipe: Any, configs: list[str] | tuple[str, ...] = DEFAULT_CONFIGS,
                modes: list[str] | tuple[str, ...] = MODES, iters: int = 10, warmup: int = 3,
                log: Any = print, isolate: bool = True, rounds: int = 1,
                baseline: str | None = None) -> list[dict[str, Any]]:
    """Rows ``{config, mode, img_per_s, speedup, step_ms, status, reason, precision, runtime}``
    (plus ``round_img_per_s`` and, against the baseline, ``round_speedup`` when ``rounds`` > 1);
    ``speedup`` is relative to ``baseline`` (default: ``stock``, or ``fp32`` when stock was not
    measured)."""
    _check_args(configs, modes, iters, warmup)
    if rounds < 1:
        raise RecipeError(f"--rounds must be >= 1, got {rounds}")
    if baseline is not None and baseline not in configs:
        raise RecipeError(f"--baseline {baseline}: not among the measured configs "
                          f"({', '.join(configs)})")
    per_round = []
    for k in range(rounds):
        if rounds > 1:
            log(f"round {k + 1}/{rounds}")
        if isolate:
            rows = []
            with tempfile.TemporaryDirectory(prefix="accelcore-bench-") as tmp:
                for name in configs:
                    rows += _run_isolated(recipe, name, modes, iters, warmup, Path(tmp))
        else:
            rows = _bench_configs(recipe, configs, modes, iters, warmup, log)
        per_round.append(rows)
    rows = _pool_rounds(per_round)
    ran = {r["config"] for r in rows if r["status"] == "ok"}
    base = baseline or ("stock" if "stock" in ran else "fp32")
    for row in rows:
        ref = next((r for r in rows if r["config"] == base and r["mode"] == row["mode"]
                    and r["status"] == "ok"), None)
        if ref is not None and row["img_per_s"] is not None:
            row["speedup"] = row["img_per_s"] / ref["img_per_s"]
            if "round_img_per_s" in row:  # paired by round: the host's drift cancels
                row["round_speedup"] = [a / b for a, b in zip(
                    row["round_img_per_s"], ref["round_img_per_s"], strict=True)]
        row["baseline"] = base
    return rows


def profile_train(recipe: Any, config: str = "fp32", iters: int = 10,
                  warmup: int = 3) -> dict[str, float]:
    """Median seconds per phase of the real e2e training step (data … EMA).

    forward/loss are split by a hook on the model's last registered child (the network's end —
    a detection head), so the step is not run twice; "loss" therefore covers label assignment
    and the loss terms.
    """
    with tempfile.TemporaryDirectory(prefix="accelcore-prof-") as tmp:
        base = Trainer(TrainJob(recipe, Path(tmp)), write=False)
        base.setup_runtime()
        base.setup_data()
        t = _trainer(recipe, config_overrides(config), base.loader, base.pm, Path(tmp))
        marks: dict[str, float] = {}
        children = list(t.model.children())
        head = children[-1] if children else None
        handle = None
        if head is not None:
            handle = head.register_forward_hook(
                lambda *_: marks.__setitem__("head", time.perf_counter()))
        phases: dict[str, list[float]] = {p: [] for p in PHASES}
        source = _batches(base.loader)
        try:
            for k in range(warmup + iters):
                t0 = time.perf_counter()
                images, targets = next(source)
                t.state.iteration = k
                images, targets = t.prepare_batch(images, targets)
                t1 = time.perf_counter()
                with t.precision.forward_context():
                    losses = t.train_model(images, targets)
                t2 = time.perf_counter()
                t.optimizer.zero_grad(set_to_none=True)
                t.precision.backward(losses["total_loss"])
                t3 = time.perf_counter()
                t.precision.optimizer_step(t.optimizer)
                t4 = time.perf_counter()
                if t.ema is not None:
                    t.ema.update(t.model)
                t5 = time.perf_counter()
                if k < warmup:
                    continue
                split = marks.get("head", t2)
                for name, value in zip(PHASES, (t1 - t0, split - t1, t2 - split, t3 - t2,
                                                t4 - t3, t5 - t4), strict=True):
                    phases[name].append(value)
        finally:
            if handle is not None:
                handle.remove()
    out = {name: statistics.median(v) for name, v in phases.items()}
    out["step"] = sum(out.values())
    out["batch"] = float(images.shape[0])
    return out
