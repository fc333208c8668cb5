"""The accelerate stage: convert, time, evaluate and save every requested method, then select.

Isolation (why a fresh process per method): conversions change process-wide torch state —
dynamo/inductor caches, inductor config, autocast caches, thread pools, the allocator's heap —
and some backends can crash the interpreter outright (e.g. OpenVINO's converter segfaulted
here with jemalloc preloaded). Each method therefore runs in its own ``spawn`` process by
default: it starts from a clean state, its latency is not coloured by the memory left behind
by the previous method, and a crash becomes a "failed" row instead of ending the run. The
price is a few seconds of start-up per method (torch import + loading the pickled job), small
next to conversion and COCO evaluation. ``isolate=False`` runs everything in this process
(tests, debugging); then dynamo is reset and the thread count restored between methods, and
every backend sets its other state (autocast, inductor config) only inside its own calls.

Every method gets exactly the same inputs: one batch of real validation images for latency,
the same calibration images, and the same evaluation through
``accelcore.predictor.Predictor(raw=True)`` (fp32 decode + NMS) and
``accelcore.evaluation.evaluate_predictor``.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import multiprocessing
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from accelcore.errors import BackendUnavailable, PluginError, one_line
from accelcore.inference.artifact import folder_size_mb, save_artifact
from accelcore.inference.auto import AUTO, MethodChoice, expand_auto
from accelcore.inference.calibration import calibration_from_tensor, load_images, spread_indices
from accelcore.inference.image_format import to_format
from accelcore.inference.latency import measure_latency, versions
from accelcore.inference.select import accuracy_drop, select_method
from accelcore.interfaces import AcceleratedModel, AccelerateRequest, Detector
from accelcore.machine import machine_info
from accelcore.runtime import RuntimeSetup, describe_runtime, runtime_label

log = logging.getLogger(__name__)
BASELINE = "original"
_ROW_KEYS = ("method", "status", "reason", "latency_ms", "p10_ms", "p90_ms", "img_per_s",
             "speedup", "ap50_95", "ap50", "convert_s", "size_mb", "precision", "summary",
             "runtime")


@dataclass
class MethodJob:
    """Everything one method needs; pickled once and shared by all method processes."""

    model: Any                      # eval-mode raw-output model (never handed to a backend)
    input_size: tuple[int, int]
    batch_size: int
    latency: dict                   # warmup, min_runs, min_seconds
    latency_batch: torch.Tensor     # [batch_size, 3, H, W] real validation images
    calibration_images: torch.Tensor
    calibration_batch: int
    val_dataset: Any
    validate: dict                  # conf_thre, nms_thre, max_images
    work_dir: Path
    staging_dir: Path
    manifest: dict                  # model/classes/input size, common to every artifact
    threads: int | None = None
    runtime: RuntimeSetup = field(default_factory=RuntimeSetup)
    plugins: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)  # per-method backend options


def _fixed_batch(forward: Any, batch: int) -> Any:
    """Pad a short final batch up to ``batch`` so shape-specialised methods never recompile."""
    def run(images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        if n >= batch:
            return forward(images)
        pad = images.new_zeros((batch - n, *images.shape[1:]))
        return forward(torch.cat((images, pad)))[:n]

    return run


def _check_output(out: Any, batch: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"forward returned {type(out).__name__}, expected a torch.Tensor")
    if out.dtype != torch.float32 or out.ndim != 3 or out.shape[0] != batch.shape[0]:
        raise ValueError(f"forward returned {out.dtype} {tuple(out.shape)}, expected float32 "
                         f"[{batch.shape[0]}, N, 5 + C]")
    if not torch.isfinite(out).all():
        raise ValueError("forward returned non-finite values")


def run_method(job: MethodJob, method: str, pm: Any, kind: str = "backend") -> dict:
    """Convert, time, evaluate and save one method; never raises (errors become the row).

    ``kind="reference"``: a plain-runtime baseline, measured the same way but never saved.
    """
    from accelcore.evaluation import evaluate_predictor
    from accelcore.inference.pt2e import compiler_cache
    from accelcore.predictor import Predictor

    row: dict[str, Any] = {k: None for k in _ROW_KEYS}
    row.update(method=method, status="failed", reason="")
    provided = pm.find(kind, method)
    row["summary"] = provided.declaration.summary if provided else ""
    if job.threads:
        torch.set_num_threads(job.threads)
    work = job.work_dir / method
    work.mkdir(parents=True, exist_ok=True)
    request = AccelerateRequest(
        batch_size=job.batch_size, input_size=job.input_size, work_dir=work,
        calibration=calibration_from_tensor(job.calibration_images, job.calibration_batch),
        options={"threads": job.threads, **job.options.get(method, {})})
    stage = "convert"
    with compiler_cache(job.work_dir / "inductor-cache"):
        try:
            t0 = time.perf_counter()
            accelerated: AcceleratedModel | None = pm.hook.accelcore_accelerate(
                method=method, model=copy.deepcopy(job.model), request=request)
            if accelerated is None:
                raise PluginError(f"no loaded plugin converts method '{method}'")
            row["precision"] = accelerated.precision
            row["input_format"] = accelerated.input_format
            # The first call is part of conversion: compiling backends build their code lazily.
            stage = "first call"
            # Timed in the method's own input layout, converted once here: a runtime that takes
            # uint8 NHWC gets what the image decoder produces, not a float batch to convert.
            native = to_format(job.latency_batch, accelerated.input_format)
            _check_output(accelerated.forward(native), job.latency_batch)
            row["convert_s"] = round(time.perf_counter() - t0, 2)
            stage = "latency"
            lat = measure_latency(accelerated.forward, native, **job.latency)
            row.update(latency_ms=lat["median_ms"], p10_ms=lat["p10_ms"], p90_ms=lat["p90_ms"],
                       img_per_s=lat["img_per_s"], runs=lat["runs"])
            stage = "evaluate"
            predictor = Predictor(_fixed_batch(accelerated, job.batch_size), job.model,
                                  raw=True, conf_thre=job.validate["conf_thre"],
                                  nms_thre=job.validate["nms_thre"])
            t1 = time.perf_counter()
            metrics = evaluate_predictor(predictor, job.val_dataset, job.input_size,
                                         batch_size=job.batch_size, progress=False,
                                         max_images=job.validate["max_images"])
            row.update(ap50_95=float(metrics["ap50_95"]), ap50=float(metrics["ap50"]),
                       eval_s=round(time.perf_counter() - t1, 2))
            row["status"] = "ok"
            row["runtime"] = describe_runtime()
            row["details"] = accelerated.details
        except BackendUnavailable as exc:
            row.update(status="unavailable", reason=one_line(exc))
            return row
        except Exception as exc:  # one method failing must not end the run
            log.debug("method %s failed during %s", method, stage, exc_info=True)
            row.update(status="failed", reason=f"{stage}: {one_line(exc)}")
            return row
        if kind == "reference":
            return row
        stage = "save"
        try:
            manifest = {**job.manifest, "input_format": accelerated.input_format,
                        "metrics": {k: row[k] for k in (
                "ap50_95", "ap50", "latency_ms", "img_per_s", "convert_s")},
                "details": accelerated.details}
            folder = save_artifact(job.staging_dir / method, accelerated, manifest)
            row["size_mb"] = round(folder_size_mb(folder), 3)
        except Exception as exc:  # measured fine but cannot be deployed: say so, keep numbers
            log.debug("saving %s failed", method, exc_info=True)
            row["reason"] = f"not saved: {one_line(exc)}"
    return row


def _child(job_path: str, method: str, result_path: str, kind: str) -> None:
    """Entry point of a method process (spawn): load the job, run, write the row as JSON."""
    from accelcore.plugins import get_plugin_manager
    from accelcore.runtime import apply_inherited_setup

    apply_inherited_setup()  # the parent's allocator/thread choice, before any real work
    try:
        job: MethodJob = torch.load(job_path, weights_only=False)
        pm = get_plugin_manager(job.plugins)
        row = run_method(job, method, pm, kind)
    except BaseException as exc:  # noqa: BLE001 - report anything, including SystemExit
        row = {"method": method, "status": "failed",
               "reason": f"method process: {one_line(exc)}",
               "traceback": traceback.format_exc(limit=5)}
    Path(result_path).write_text(json.dumps(row, default=str))


def _run_in_process(job_path: Path, method: str, work_dir: Path,
                    setup: RuntimeSetup, kind: str = "backend") -> dict:
    result = work_dir / f"{method}.result.json"
    result.unlink(missing_ok=True)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_child, args=(str(job_path), method, str(result), kind),
                       name=f"accelcore-{method}")
    with setup.exported():  # spawn inherits the environment: allocator + threads from the start
        proc.start()
    proc.join()
    if result.is_file():
        return json.loads(result.read_text())
    code = proc.exitcode
    how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
    return {"method": method, "status": "failed",
            "reason": f"method process died ({how}) before reporting"}


def _input_size(recipe: Any, model: Detector) -> tuple[int, int]:
    size = recipe.model.input_size or model.input_size
    return int(size[0]), int(size[1])


def _manifest_model(recipe: Any, model: Detector) -> dict:
    """What ``create_model`` needs to rebuild the model's decode/NMS when the artifact is
    loaded: the recipe's ``model.*`` keys (the plugin may need any of them), never weights."""
    config = {k: v for k, v in dataclasses.asdict(recipe.model).items()
              if v is not None and k not in ("checkpoint", "finetune")}
    return {**config, "name": model.meta.get("name", recipe.model.name),
            "num_classes": int(model.meta.get("num_classes", model.num_classes))}


def resolve_methods(methods: list[str], pm: Any,
                    flags: set[str] | None = None) -> tuple[list[str], list[MethodChoice]]:
    """The methods to run, ``original`` first, and the ones ``auto`` skipped (with reasons).

    Every listed name is checked against the declared backends (one-line error for unknown
    ones); ``auto`` expands to the methods that can be fast on this CPU
    (:mod:`accelcore.inference.auto`). ``original`` is added if missing: speed-ups and the
    accuracy criterion are relative to it.
    """
    for i, method in enumerate(methods):
        if method != AUTO:
            pm.require("backend", method, f"accelerate.methods[{i}]", available=False)
    expanded, skipped = expand_auto(methods, pm, flags)
    ordered = list(dict.fromkeys(expanded))
    if BASELINE in ordered:
        ordered.remove(BASELINE)
    return [BASELINE, *ordered], skipped


def run_accelerate(recipe: Any, model: Detector, run_dir: Path, val_dataset: Any,
                   calib_dataset: Any, pm: Any, isolate: bool | None = None) -> dict:
    """Run the accelerate stage of ``recipe`` for ``model``; returns the results dict.

    Keys: ``methods`` (one row per method: method, status ok/failed/unavailable, reason,
    latency_ms (median), p10_ms, p90_ms, img_per_s, speedup vs original, ap50_95, ap50 (COCOeval
    0-1 scale), convert_s, size_mb, precision, summary), ``batch_size``, ``input_size``,
    ``machine``, ``versions``, ``selected``, ``selection_reason``, ``artifacts``.
    Artifacts go to ``run_dir/artifacts/<method>/`` per ``accelerate.save`` (best/all/none).
    """
    cfg = recipe.accelerate
    isolate = cfg.isolate if isolate is None else isolate
    run_dir = Path(run_dir)
    methods, skipped = resolve_methods(cfg.methods, pm)
    input_size = _input_size(recipe, model)
    raw = copy.deepcopy(model).eval()
    raw.output_mode = "raw"  # the backend contract: the undecoded output (Detector)
    for p in raw.parameters():
        p.requires_grad_(False)

    work_dir = run_dir / "accelerate"
    staging = work_dir / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    calib_n = min(cfg.calibration_images, len(calib_dataset))
    class_names = list(getattr(val_dataset, "class_names", []) or [])
    job = MethodJob(
        model=raw, input_size=input_size, batch_size=cfg.batch_size,
        latency={"warmup": cfg.latency.warmup, "min_runs": cfg.latency.min_runs,
                 "min_seconds": cfg.latency.min_seconds},
        latency_batch=load_images(val_dataset, spread_indices(len(val_dataset), cfg.batch_size),
                                  input_size),
        calibration_images=load_images(calib_dataset, spread_indices(len(calib_dataset),
                                                                     calib_n), input_size),
        calibration_batch=min(cfg.batch_size, 16),
        val_dataset=val_dataset,
        validate={"conf_thre": recipe.validate.conf_thre, "nms_thre": recipe.validate.nms_thre,
                  "max_images": recipe.validate.max_images},
        work_dir=work_dir, staging_dir=staging,
        manifest={"model": _manifest_model(recipe, raw),
                  "class_names": class_names, "input_size": list(input_size),
                  "batch_size": cfg.batch_size, "versions": versions(pm)},
        threads=cfg.threads, runtime=RuntimeSetup.from_recipe(recipe, threads=cfg.threads),
        plugins=list(recipe.plugins), options=dict(cfg.options))
    job_path = work_dir / "job.pt"
    if isolate:
        torch.save(job, job_path)

    rows: list[dict] = []
    threads_before = torch.get_num_threads()
    if not isolate:
        job.runtime.apply()  # in-process methods run under the same setup as isolated ones
    for method in methods:
        provided = pm.find("backend", method)
        if not provided.declaration.available:
            row = {k: None for k in _ROW_KEYS}
            row.update(method=method, status="unavailable", reason=provided.declaration.reason,
                       summary=provided.declaration.summary)
        elif isolate:
            row = _run_in_process(job_path, method, work_dir, job.runtime)
        else:
            row = run_method(job, method, pm)
            torch._dynamo.reset()  # compiled code of one method must not serve the next
            torch.set_num_threads(threads_before)
            gc.collect()
        for key in _ROW_KEYS:
            row.setdefault(key, None)
        rows.append(row)
        _print_row(row)

    for choice in skipped:  # in the report, with the reason, but not run
        row = {k: None for k in _ROW_KEYS}
        decl = pm.find("backend", choice.method).declaration
        row.update(method=choice.method, status="skipped" if decl.available else "unavailable",
                   reason=choice.reason, summary=decl.summary)
        rows.append(row)
    base = rows[0]
    for row in rows:
        if row["latency_ms"] and base.get("latency_ms"):
            row["speedup"] = base["latency_ms"] / row["latency_ms"]
    selected, why = select_method(rows, cfg.accuracy_criterion, BASELINE)
    references = run_references(job, job_path if isolate else None, cfg.references, pm)
    lead = compute_lead(rows, references, selected, cfg.accuracy_criterion)
    artifacts = _keep_artifacts(rows, staging, run_dir / "artifacts", cfg.save, selected)
    job_path.unlink(missing_ok=True)
    return {
        "references": references, "lead": lead,
        "methods": rows, "batch_size": cfg.batch_size, "input_size": list(input_size),
        "machine": {**machine_info(), "accelerate_threads": cfg.threads or threads_before},
        "runtime_setup": dataclasses.asdict(job.runtime),
        "versions": versions(pm), "selected": selected, "selection_reason": why,
        "accuracy_criterion": {"metric": cfg.accuracy_criterion.metric,
                               "kind": cfg.accuracy_criterion.kind,
                               "max_drop": cfg.accuracy_criterion.max_drop},
        "latency": job.latency, "calibration_images": calib_n, "isolated": isolate,
        "artifacts": artifacts,
    }


def reference_names(requested: list[str], pm: Any) -> list[str]:
    """``accelerate.references`` with ``auto`` expanded to every declared reference."""
    names: list[str] = []
    for i, name in enumerate(requested):
        if name == AUTO:
            names.extend(pm.names("reference"))
        else:
            pm.require("reference", name, f"accelerate.references[{i}]", available=False)
            names.append(name)
    return list(dict.fromkeys(names))


def run_references(job: MethodJob, job_path: Path | None, requested: list[str],
                   pm: Any) -> list[dict]:
    """Measure the plain-runtime reference rows exactly as the methods are measured.

    Each runs in its own process (``job_path`` given) under the project's setup, or under the
    stock runtime if its declaration asks for it (``torch_plain_fp32``: what a user has before
    installing accelcore). In-process runs cannot undo this process's tuning; their ``runtime``
    field then says what they really ran under.
    """
    rows: list[dict] = []
    for name in reference_names(requested, pm):
        decl = pm.find("reference", name).declaration
        setup = RuntimeSetup.stock() if decl.stock_runtime else job.runtime
        if not decl.available:
            raw = {"method": name, "status": "unavailable", "reason": decl.reason}
        elif job_path is not None:
            raw = _run_in_process(job_path, name, job.work_dir, setup, kind="reference")
        else:
            raw = run_method(job, name, pm, kind="reference")
            torch._dynamo.reset()
            gc.collect()
        runtime = raw.get("runtime")
        row = {"name": name, "status": raw.get("status"), "reason": raw.get("reason", ""),
               "runtime": runtime_label(runtime) if runtime else None,
               "runtime_setup": dataclasses.asdict(setup), "precision": raw.get("precision"),
               "latency_ms": raw.get("latency_ms"), "p10_ms": raw.get("p10_ms"),
               "p90_ms": raw.get("p90_ms"), "img_per_s": raw.get("img_per_s"),
               "ap50_95": raw.get("ap50_95"), "ap50": raw.get("ap50"),
               "settings": raw.get("details") or {}, "summary": decl.summary}
        rows.append(row)
        _print_row({**raw, "method": f"[reference] {name}"})
    return rows


def compute_lead(rows: list[dict], references: list[dict], selected: str | None,
                 criterion: Any) -> dict:
    """``{selected, best_reference, ratio}``: ratio = best reference latency / selected latency,
    the best reference being the fastest one within the same accuracy criterion (vs original)."""
    by_name = {r["method"]: r for r in rows}
    base = by_name.get(BASELINE)
    ok_refs = []
    for ref in references:
        if ref["status"] != "ok" or ref["latency_ms"] is None or base is None:
            continue
        if base.get("latency_ms"):
            ref["speedup"] = base["latency_ms"] / ref["latency_ms"]
        drop = accuracy_drop(ref, base, criterion.metric, criterion.kind)
        ref["accuracy_drop"] = drop
        if drop is not None and drop <= criterion.max_drop:
            ok_refs.append(ref)
    best = min(ok_refs, key=lambda r: r["latency_ms"], default=None)
    chosen = by_name.get(selected) if selected else None
    ratio = (best["latency_ms"] / chosen["latency_ms"]
             if best is not None and chosen is not None and chosen["latency_ms"] else None)
    return {"selected": selected,
            "selected_latency_ms": chosen["latency_ms"] if chosen else None,
            "best_reference": best["name"] if best else None,
            "best_reference_latency_ms": best["latency_ms"] if best else None,
            "ratio": ratio}


def _keep_artifacts(rows: list[dict], staging: Path, dest: Path, policy: str,
                    selected: str | None) -> dict[str, str]:
    keep = {r["method"] for r in rows if r["status"] == "ok"} if policy == "all" else (
        {selected} if policy == "best" and selected else set())
    kept: dict[str, str] = {}
    for method in sorted(keep):
        src = staging / method
        if (src / "manifest.json").is_file():
            dest.mkdir(parents=True, exist_ok=True)
            target = dest / method
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(str(src), str(target))
            kept[method] = str(target)
    shutil.rmtree(staging, ignore_errors=True)
    return kept


def _print_row(row: dict) -> None:
    if row["status"] != "ok":
        print(f"accelcore: accelerate {row['method']:<20} {row['status']}: {row['reason']}")
        return
    print(f"accelcore: accelerate {row['method']:<20} {row['latency_ms']:9.1f} ms/batch  "
          f"AP50:95 {row['ap50_95']:.4f}  AP50 {row['ap50']:.4f}  convert {row['convert_s']} s")
