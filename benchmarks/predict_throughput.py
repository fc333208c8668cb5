"""Throughput of ``accelcore predict`` on real JPEGs: the streaming pipeline against the model
alone and against a plain sequential loop, with the same artifact.

    python benchmarks/predict_throughput.py --model RUN/artifacts/openvino_int8 [--model …]

For each artifact (same process, one after the other, the project's runtime setup applied):

* ``e2e``: :func:`accelcore.inference.stream.stream_predict` over the images of ``--source``
  (default ``../shared/data/coco128/train2017``, 128 COCO JPEGs; ``--repeat`` passes, default
  3), timing only (``--no-save``; ``--save`` also draws and writes every image): JPEG decode,
  letterbox, inference, decode + NMS, in overlapped stages. Its summary carries
  ``model_img_per_s``: the forward alone on a preloaded batch of the same images, same batch
  size, measured in the same run.
* ``sequential``: a plain loop over the same files with the same artifact and batch size —
  read, letterbox, stack, forward, decode + NMS, one batch at a time.

Targets (issue 14): ``e2e >= 70 %`` of ``model_img_per_s`` and ``>= 1.4x`` the sequential loop.
Writes ``benchmarks/results/predict_throughput_<date>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "coco128" / "train2017"
TARGET_OF_MODEL = 0.70
TARGET_OF_SEQUENTIAL = 1.4


def sequential_loop(model: Any, files: list[Path], batch_size: int, conf: float,
                    nms: float) -> dict[str, Any]:
    """Read, letterbox, forward, decode + NMS: one batch at a time, nothing overlapped."""
    import numpy as np
    import torch

    from accelcore.data.preprocess import letterbox_hwc, read_image
    from accelcore.inference.stream import stack_batch
    from accelcore.predictor import Predictor

    predictor = Predictor(model.accelerated, model.decoder, raw=True, conf_thre=conf,
                          nms_thre=nms)
    fmt = model.accelerated.input_format
    size = tuple(model.input_size)
    images = detections = 0
    started = time.perf_counter()
    for start in range(0, len(files), batch_size):
        canvases, ratios = [], []
        for path in files[start:start + batch_size]:
            canvas, ratio = letterbox_hwc(read_image(path), size)
            canvases.append(canvas)
            ratios.append(ratio)
        batch = stack_batch(canvases, batch_size, fmt)
        with torch.inference_mode():
            raw = model.accelerated.forward(batch)
        for dets, ratio in zip(predictor.detections(raw[:len(canvases)], size), ratios,
                               strict=True):
            dets = np.asarray(dets, dtype=np.float32).copy()
            dets[:, :4] /= ratio
            detections += len(dets)
        images += len(canvases)
    seconds = time.perf_counter() - started
    return {"images": images, "detections": detections, "seconds": round(seconds, 4),
            "img_per_s": round(images / seconds, 2)}


def measure(artifact: str, files: list[Path], args: argparse.Namespace,
            out_dir: Path | None) -> dict[str, Any]:
    from accelcore.inference.artifact import load_artifact
    from accelcore.inference.stream import Source, StreamOptions, StreamRun, relative_names

    model = load_artifact(artifact)
    batch_size = int(args.batch_size or model.batch_size)
    names = [f"{k:05d}_{name}" for k, name in enumerate(relative_names(files))]
    source = Source(f"{args.source} x{args.repeat}", files=files, names=names)
    options = StreamOptions(batch_size=batch_size, conf=args.conf, nms=args.nms,
                            save=out_dir is not None, readers=args.readers,
                            model_seconds=args.model_seconds)
    # Sequential first (after its own warm-up batch), then the pipeline; both warm.
    sequential_loop(model, files[:batch_size], batch_size, args.conf, args.nms)
    sequential = sequential_loop(model, files, batch_size, args.conf, args.nms)
    run = StreamRun(model, source, out_dir, options, on_skip=lambda line: None)
    e2e = run.run()
    row = {
        "artifact": str(artifact), "method": model.method, "precision": model.precision,
        "input_format": e2e["input_format"], "input_size": e2e["input_size"],
        "batch_size": batch_size, "images": e2e["images"],
        "e2e_img_per_s": e2e["img_per_s"], "model_img_per_s": e2e["model_img_per_s"],
        "e2e_vs_model": e2e["e2e_vs_model"],
        "sequential_img_per_s": sequential["img_per_s"],
        "e2e_vs_sequential": round(e2e["img_per_s"] / sequential["img_per_s"], 3),
        "stage_seconds": e2e["stage_seconds"], "seconds": e2e["seconds"],
        "sequential_seconds": sequential["seconds"], "readers": e2e["readers"],
        "detections": {"e2e": e2e["detections"], "sequential": sequential["detections"]},
        "saved": out_dir is not None, "runtime": e2e["runtime"],
    }
    row["meets_targets"] = bool(
        row["e2e_vs_model"] is not None and row["e2e_vs_model"] >= TARGET_OF_MODEL
        and row["e2e_vs_sequential"] >= TARGET_OF_SEQUENTIAL)
    del model, run
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from accelcore.inference.latency import versions
    from accelcore.inference.stream import IMAGE_EXT
    from accelcore.machine import machine_info
    from accelcore.plugins import get_plugin_manager
    from accelcore.runtime import RuntimeSetup

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", required=True, metavar="ARTIFACT",
                   help="artifact folder (repeatable)")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder of images")
    p.add_argument("--repeat", type=int, default=3, help="passes over the images")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: each artifact's own")
    p.add_argument("--readers", type=int, default=None)
    p.add_argument("--conf", type=float, default=0.3)
    p.add_argument("--nms", type=float, default=0.45)
    p.add_argument("--model-seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save", action="store_true",
                   help="also draw and write the annotated images (into a temporary folder)")
    p.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/"
                                            "predict_throughput_<date>.json)")
    args = p.parse_args(argv)

    files = sorted(f for f in args.source.iterdir() if f.suffix.lower() in IMAGE_EXT)
    if not files:
        raise SystemExit(f"predict_throughput: no images in {args.source}")
    files = files * max(1, args.repeat)
    RuntimeSetup(threads=args.threads).apply()
    rows = []
    with tempfile.TemporaryDirectory(prefix="accelcore-throughput-") as tmp:
        for k, artifact in enumerate(args.model):
            print(f"predict_throughput: {artifact} ...", flush=True)
            out_dir = Path(tmp) / str(k) if args.save else None
            rows.append(measure(artifact, files, args, out_dir))
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(),
        "versions": versions(get_plugin_manager()),
        "settings": {"source": str(args.source), "images_per_pass": len(files) // args.repeat,
                     "repeat": args.repeat, "conf": args.conf, "nms": args.nms,
                     "save": args.save, "model_seconds": args.model_seconds},
        "targets": {"e2e_vs_model": TARGET_OF_MODEL, "e2e_vs_sequential": TARGET_OF_SEQUENTIAL},
        "rows": rows,
    }
    out = args.out or (REPO / "benchmarks" / "results"
                       / f"predict_throughput_{time.strftime('%Y%m%d')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\n{result['machine'].get('cpu')}, {rows[0]['runtime']['threads'] if rows else '?'} "
          f"threads, {len(files)} images ({args.repeat} x {args.source})")
    head = (f"{'method':<26} {'batch':>5} {'e2e img/s':>10} {'model img/s':>12} "
            f"{'e2e/model':>9} {'seq img/s':>10} {'e2e/seq':>8}  targets")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:<26} {r['batch_size']:>5} {r['e2e_img_per_s']:>10.1f} "
              f"{r['model_img_per_s'] or float('nan'):>12.1f} "
              f"{100 * (r['e2e_vs_model'] or 0):>8.0f}% {r['sequential_img_per_s']:>10.1f} "
              f"{r['e2e_vs_sequential']:>7.2f}x  {'met' if r['meets_targets'] else 'NOT met'}")
    print(f"-> {out}")
    return 0 if rows and all(r["meets_targets"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
