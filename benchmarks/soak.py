"""Soak benchmark: every artifact type runs thousands of batches and is loaded and released
again and again in one process; resident memory and crashes are reported.

    python benchmarks/soak.py                      # make the artifacts, soak each, write JSON
    python benchmarks/soak.py --artifacts RUN/artifacts --methods openvino_int8,original

Artifacts: ``accelcore optimize`` on the shipped checkpoint (``checkpoints/yolox_nano_synthetic
.pth``) at ``--size`` px (default 160) and batch ``--batch`` (default 8), one method per artifact
type (``--methods``; default: original = eager torch, jit_fp32, inductor_fp32, openvino_int8,
onnxruntime_fp32), every one saved. Each method then runs in a child process of its own, so a
crash (a signal, an abort in a native runtime) becomes that row's status instead of ending the
soak. In the child:

1. warm-up: load the artifact, run ``--warmup`` batches (default 50) and ``--warmup-loads``
   load/release cycles (default 2, as in step 3; every code path has run once), take the RSS
   ("warm");
2. ``--batches`` batches (default 2000): the native forward on a preloaded batch + the
   detector's decode and NMS (:meth:`accelcore.predictor.Predictor.detections`), cycling
   through 4 different image batches;
3. ``--loads`` times (default 100): load the artifact again, run one batch on it, release it
   (``del`` + ``gc.collect()``), while the first model stays loaded;
4. take the RSS ("end"). ``growth_pct`` = (end - warm) / warm; the target is <= 5 %.

``--jobs`` children (default 2) run at a time, each with cores / jobs threads: loading is
mostly single-threaded Python (``torch.export.load`` of an eager artifact takes ~3.5 s), so two
children keep both cores busy. Runtime on 2 cores at the defaults: ~1.5 min to make the
artifacts, then ~8 min for the five types, set by the eager artifact's 100 loads (~6 min).
Inductor artifacts load their ahead-of-time package in milliseconds; an artifact that compiles on
its first call after every load (one loaded on a CPU its package was not built for: ~20-30 s
each) has its load cycles stopped after ``--max-load-seconds`` (default 240 s) when slower than
10 s per cycle, and the row records how many ran (``loads_done``, ``loads_note``);
``--max-load-seconds 0`` runs all of them. Results: ``benchmarks/results/soak_<date>.json``
and a table on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Longest first: the slowest loader (eager: torch.export.load ~3.5 s) starts at once.
DEFAULT_METHODS = ("original", "inductor_fp32", "jit_fp32", "openvino_int8", "onnxruntime_fp32")
GROWTH_TARGET_PCT = 5.0
#: A load cycle slower than this compiles on its first call; only those are cut short by
#: --max-load-seconds.
SLOW_LOAD_S = 10.0


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


# ---------------------------------------------------------------- making the artifacts


def make_artifacts(checkpoint: Path, methods: list[str], size: int, batch: int,
                   run_dir: Path) -> Path:
    """``accelcore optimize`` with every method saved, quick latency/accuracy settings."""
    command = [
        sys.executable, "-m", "accelcore.cli", "optimize", "--model", str(checkpoint),
        "--methods", ",".join(methods), "--out", str(run_dir),
        "--set", f"accelerate.batch_size={batch}",
        "--set", f"model.input_size=[{size},{size}]",
        "--set", "accelerate.save=all",
        "--set", "accelerate.latency={warmup: 1, min_runs: 2, min_seconds: 0.5}",
        "--set", "accelerate.calibration_images=16",
        "--set", "validate.max_images=16",
        "--set", "accelerate.references=[]",
        "--set", "report.formats=[json]",
    ]
    print(f"soak: making artifacts ({', '.join(methods)}) at {size} px, batch {batch} ...",
          flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise SystemExit(f"soak: accelcore optimize failed: {tail[0]}")
    return run_dir / "artifacts"


# ---------------------------------------------------------------- the child


def image_batches(input_size: tuple[int, int], batch: int, count: int = 4) -> list[Any]:
    """``count`` different uint8 NHWC batches of smooth image-like content (seeded)."""
    import numpy as np
    import torch

    out = []
    for seed in range(count):
        gen = torch.Generator().manual_seed(seed)
        low = torch.rand(batch, 3, input_size[0] // 8, input_size[1] // 8, generator=gen) * 255
        smooth = torch.nn.functional.interpolate(low, size=tuple(input_size), mode="bilinear",
                                                 align_corners=False)
        out.append(smooth.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy())
    return [np.ascontiguousarray(b) for b in out]


def soak_child(artifact: Path, batches: int, warmup: int, warmup_loads: int, loads: int,
               max_load_s: float, threads: int | None, progress: Path) -> dict[str, Any]:
    import torch

    from accelcore.inference.artifact import load_artifact
    from accelcore.inference.image_format import to_format
    from accelcore.predictor import Predictor
    from accelcore.runtime import RuntimeSetup, describe_runtime

    RuntimeSetup(threads=threads).apply()  # before loading: runtimes read the thread count
    row: dict[str, Any] = {"rss_mb": {"start": round(rss_mb(), 1)}, "phase": "load",
                           "threads": torch.get_num_threads()}

    def save_progress() -> None:  # what the parent reports if this process dies
        progress.write_text(json.dumps(row))

    model = load_artifact(artifact)
    row.update(method=model.method, precision=model.precision,
               input_format=model.accelerated.input_format,
               input_size=list(model.input_size), batch_size=model.batch_size)
    native = [to_format(torch.from_numpy(b), model.accelerated.input_format)
              for b in image_batches(model.input_size, model.batch_size)]
    predictor = Predictor(model.accelerated, model.decoder, raw=True, conf_thre=0.3,
                          nms_thre=0.45)
    forward = model.accelerated.forward

    def one_batch(run_forward: Any, k: int) -> int:
        with torch.inference_mode():
            raw = run_forward(native[k % len(native)])
        return sum(len(d) for d in predictor.detections(raw, model.input_size))

    def load_cycle(k: int) -> None:
        again = load_artifact(artifact)
        one_batch(again.accelerated.forward, k)
        del again
        gc.collect()

    row["phase"] = "warm-up"
    for k in range(warmup):
        one_batch(forward, k)
    for k in range(warmup_loads):
        load_cycle(k)
    gc.collect()
    row["rss_mb"]["warm"] = round(rss_mb(), 1)

    row["phase"] = "batches"
    series: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    for k in range(batches):
        one_batch(forward, k)
        if (k + 1) % 100 == 0:
            series.append((k + 1, round(rss_mb(), 1)))
            row["batches_done"] = k + 1
            row["rss_series_batches"] = series
            save_progress()
    row["batches_done"] = batches
    row["batch_seconds"] = round(time.perf_counter() - t0, 2)
    gc.collect()
    row["rss_mb"]["after_batches"] = round(rss_mb(), 1)

    row["phase"] = "loads"
    load_series: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    done = 0
    for i in range(loads):
        load_cycle(i)
        done = i + 1
        if done % 10 == 0 or done == 1:
            load_series.append((done, round(rss_mb(), 1)))
            row["loads_done"] = done
            row["rss_series_loads"] = load_series
            save_progress()
        spent = time.perf_counter() - t0
        if (max_load_s > 0 and spent > max_load_s and spent / done > SLOW_LOAD_S
                and done < loads):
            row["loads_note"] = (f"stopped after {done} of {loads} loads by --max-load-seconds "
                                 f"{max_load_s:g} ({spent / done:.1f} s per load: the first "
                                 "call after a load compiles)")
            break
    row["loads_done"] = done
    row["load_seconds"] = round(time.perf_counter() - t0, 2)
    gc.collect()
    row["rss_mb"]["end"] = round(rss_mb(), 1)
    warm = row["rss_mb"]["warm"]
    row["growth_pct"] = round(100.0 * (row["rss_mb"]["end"] - warm) / warm, 2)
    row["batch_growth_pct"] = round(100.0 * (row["rss_mb"]["after_batches"] - warm) / warm, 2)
    row["runtime"] = describe_runtime()
    row["phase"] = "done"
    row["status"] = "ok"
    save_progress()
    return row


# ---------------------------------------------------------------- the parent


def run_child(artifact: Path, args: argparse.Namespace, work: Path,
              threads: int) -> dict[str, Any]:
    progress = work / f"{artifact.name}.progress.json"
    progress.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(artifact),
               "--batches", str(args.batches), "--warmup", str(args.warmup),
               "--warmup-loads", str(args.warmup_loads), "--loads", str(args.loads),
               "--max-load-seconds", str(args.max_load_seconds), "--threads", str(threads),
               "--progress", str(progress)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = None
        stderr = (exc.stderr or b"").decode(errors="replace") if isinstance(
            exc.stderr, bytes) else (exc.stderr or "")
    row: dict[str, Any] = {}
    if progress.is_file():
        row = json.loads(progress.read_text())
    row.setdefault("method", artifact.name)
    row["wall_seconds"] = round(time.perf_counter() - started, 1)
    if code is None:
        row.update(status="hung", reason=f"no result within --timeout {args.timeout:g} s "
                                         f"(phase {row.get('phase')})")
    elif code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        row.update(status="crashed", reason=f"killed by {name} during {row.get('phase')}")
    elif code != 0 or row.get("status") != "ok":
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        row.update(status="failed", reason=(lines[-1] if lines else f"exit code {code}")[:300])
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'method':<18} {'status':<8} {'batches':>7} {'loads':>5} {'warm MB':>8} "
            f"{'end MB':>8} {'growth':>7} {'batch s':>8} {'load s':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        rss = r.get("rss_mb") or {}
        growth = r.get("growth_pct")
        print(f"{r.get('method', '?'):<18} {r.get('status', '?'):<8} "
              f"{r.get('batches_done', 0):>7} {r.get('loads_done', 0):>5} "
              f"{rss.get('warm', float('nan')):>8.1f} {rss.get('end', float('nan')):>8.1f} "
              f"{(f'{growth:+.1f}%' if growth is not None else '-'):>7} "
              f"{r.get('batch_seconds', float('nan')):>8.1f} "
              f"{r.get('load_seconds', float('nan')):>7.1f}")
        for key in ("reason", "loads_note"):
            if r.get(key):
                print(f"    {key}: {r[key]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path,
                   default=REPO / "checkpoints" / "yolox_nano_synthetic.pth")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="one method per artifact type (comma-separated)")
    p.add_argument("--artifacts", type=Path,
                   help="use the artifacts in this folder (<run>/artifacts) instead of making "
                        "them")
    p.add_argument("--size", type=int, default=160, help="input px of the made artifacts")
    p.add_argument("--batch", type=int, default=8, help="batch of the made artifacts")
    p.add_argument("--batches", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=50, help="warm-up batches")
    p.add_argument("--warmup-loads", type=int, default=2, help="warm-up load/release cycles")
    p.add_argument("--loads", type=int, default=100)
    p.add_argument("--max-load-seconds", type=float, default=240.0,
                   help="stop the load cycles of a type that compiles on every load (> 10 s "
                        "per cycle) after this long (0: never)")
    p.add_argument("--jobs", type=int, default=2, help="children at a time")
    p.add_argument("--threads", type=int, default=None,
                   help="threads per child (default: usable cores / --jobs)")
    p.add_argument("--timeout", type=float, default=3600.0, help="per type, seconds")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/"
                                            "soak_<date>.json)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--progress", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        soak_child(args.child, args.batches, args.warmup, args.warmup_loads, args.loads,
                   args.max_load_seconds, args.threads, args.progress)
        return 0

    from accelcore.inference.latency import versions
    from accelcore.machine import machine_info
    from accelcore.plugins import get_plugin_manager

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="accelcore-soak-") as tmp:
        work = Path(tmp)
        folder = args.artifacts or make_artifacts(args.checkpoint, methods, args.size,
                                                  args.batch, work / "run")
        jobs = max(1, args.jobs)
        threads = args.threads or max(1, len(os.sched_getaffinity(0)) // jobs)

        def soak_one(method: str) -> dict[str, Any]:
            artifact = folder / method
            if not (artifact / "manifest.json").is_file():
                return {"method": method, "status": "missing",
                        "reason": f"no artifact at {artifact}"}
            row = run_child(artifact, args, work, threads)
            print(f"soak: {method}: {row.get('status')} after {row['wall_seconds']:.0f} s",
                  flush=True)
            return row

        print(f"soak: {len(methods)} type(s), {jobs} at a time, {threads} thread(s) each",
              flush=True)
        with ThreadPoolExecutor(jobs) as pool:  # each job is a child process
            rows = list(pool.map(soak_one, methods))
    ok = [r for r in rows if r.get("status") == "ok"]
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": machine_info(),
        "versions": versions(get_plugin_manager()),
        "settings": {"checkpoint": str(args.checkpoint), "size": args.size, "batch": args.batch,
                     "batches": args.batches, "warmup": args.warmup,
                     "warmup_loads": args.warmup_loads, "loads": args.loads,
                     "jobs": jobs, "threads_per_child": threads,
                     "max_load_seconds": args.max_load_seconds,
                     "artifacts": str(args.artifacts) if args.artifacts else "made by optimize"},
        "target": {"growth_pct_max": GROWTH_TARGET_PCT, "crashes": 0},
        "all_within_target": bool(ok) and len(ok) == len(rows) and all(
            r["growth_pct"] <= GROWTH_TARGET_PCT for r in ok),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    out = args.out or REPO / "benchmarks" / "results" / f"soak_{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print()
    print(f"soak on {result['machine'].get('cpu')}, {args.size} px, batch {args.batch}, "
          f"{args.batches} batches, {args.loads} loads per type "
          f"({result['wall_seconds'] / 60:.1f} min)")
    print_table(rows)
    print(f"\nsoak: {'all within' if result['all_within_target'] else 'NOT all within'} "
          f"{GROWTH_TARGET_PCT:g}% RSS growth with no crash -> {out}")
    return 0 if result["all_within_target"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
