"""``accelcore predict``: run a saved artifact on images (a file, folder, glob or list) or a video.

Reading, inference and post-processing overlap (:mod:`accelcore.inference.stream`); with
``--strategy ray`` the images are spread over a Ray actor pool instead
(:mod:`accelcore.inference.stream_ray`). Writes annotated copies (boxes + class + score) or an
annotated video, ``detections.json`` in COCO results style (``image``, ``bbox`` [x, y, w, h] in
original pixels, ``score``, ``category_id`` = class index, ``category``; ``frame`` for video),
and prints a summary (``--json`` writes it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from accelcore.commands import add_plugin_option
from accelcore.errors import AccelcoreError

STRATEGIES = ("threads", "ray")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="detect objects with a saved artifact",
        description="Run an artifact (<run>/artifacts/<method>/) on images or a video and write "
                    "annotated outputs, detections.json and a throughput summary.")
    p.add_argument("--model", required=True, metavar="ARTIFACT", help="artifact folder")
    p.add_argument("--source", required=True, metavar="IMG|DIR|GLOB|LIST.txt|VIDEO",
                   help="an image, a folder of images, a quoted glob ('photos/**/*.jpg'), a "
                        ".txt list of image paths, or a video")
    p.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    p.add_argument("--conf", type=float, default=0.3, help="score threshold (default 0.3)")
    p.add_argument("--nms", type=float, default=0.45, help="NMS IoU threshold (default 0.45)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward (default: the artifact's batch size)")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="write the summary here")
    p.add_argument("--no-save", action="store_true",
                   help="timing only: write no annotated outputs and no detections.json")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop at the first unreadable file (default: report it, skip it, count "
                        "it in the summary)")
    p.add_argument("--readers", type=int, default=None,
                   help="decode threads (default: the usable cores, 2 to 4)")
    p.add_argument("--model-seconds", type=float, default=3.0,
                   help="minimum time of the forward-only measurement in the summary "
                        "(default 3; 0 skips it)")
    p.add_argument("--threads", type=int, default=None,
                   help="runtime threads (default: the recipe's accelerate.threads, else one "
                        "per usable core)")
    p.add_argument("--recipe", help="take the runtime setup (allocator, malloc tuning, threads) "
                                    "from this recipe (default: the built-in setup)")
    p.add_argument("--strategy", choices=STRATEGIES, default="threads",
                   help="threads (default: one process, overlapped stages) or ray (a Ray Data "
                        "actor pool, one artifact per actor; images only)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="with --strategy ray: the cluster ('auto', 'host:6379', "
                        "'ray://host:10001'); default: a private local Ray")
    p.add_argument("--workers", type=int, default=None,
                   help="with --strategy ray: actors (default: CPUs / --cpus-per-worker)")
    p.add_argument("--cpus-per-worker", type=int, default=None,
                   help="with --strategy ray: CPUs reserved (= threads) per actor (default 1)")
    add_plugin_option(p)
    p.set_defaults(handler=handle)


def runtime_setup(args: argparse.Namespace) -> Any:
    """The process setup predict runs under: the recipe's (``--recipe``) or the built-in one,
    ``--threads`` overriding the thread count."""
    from accelcore.runtime import RuntimeSetup

    if args.recipe:
        from accelcore.config import load_recipe

        recipe = load_recipe(args.recipe)
        threads = args.threads if args.threads is not None else recipe.accelerate.threads
        return RuntimeSetup.from_recipe(recipe, threads=threads), list(recipe.plugins)
    return RuntimeSetup(threads=args.threads), []


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "readers", "threads", "workers", "cpus_per_worker"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise AccelcoreError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    if args.strategy != "ray":
        for name in ("ray_address", "workers", "cpus_per_worker"):
            if getattr(args, name) is not None:
                raise AccelcoreError(f"--{name.replace('_', '-')}: only with --strategy ray")


def handle(args: argparse.Namespace) -> int:
    from accelcore.inference.stream import StreamOptions, format_summary, resolve_source
    from accelcore.runtime import require_allocator

    _check_args(args)
    setup, recipe_plugins = runtime_setup(args)
    require_allocator(setup.allocator, getattr(args, "command_line", None))
    plugins = [*recipe_plugins, *args.plugins]
    source = resolve_source(args.source)
    options = StreamOptions(batch_size=args.batch_size, conf=args.conf, nms=args.nms,
                            save=not args.no_save, fail_fast=args.fail_fast,
                            readers=args.readers, model_seconds=args.model_seconds)
    out = None if args.no_save else Path(args.out)
    if args.strategy == "ray":
        from accelcore.inference.stream_ray import ray_predict

        summary = ray_predict(args.model, source, out, options, setup=setup, plugins=plugins,
                              address=args.ray_address, workers=args.workers,
                              cpus_per_worker=args.cpus_per_worker)
    else:
        summary = _predict_threads(args.model, source, out, options, setup, plugins)
    print(format_summary(summary))
    if args.json_path:
        path = Path(args.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str))
    return 0


def _predict_threads(artifact: str, source: Any, out: Path | None, options: Any, setup: Any,
                     plugins: list[str]) -> dict:
    from accelcore.inference.artifact import load_artifact
    from accelcore.inference.stream import stream_predict
    from accelcore.plugins import get_plugin_manager

    setup.apply()  # before loading: runtimes take their thread count at load time
    t0 = time.perf_counter()
    model = load_artifact(artifact, pm=get_plugin_manager(plugins))
    load_s = time.perf_counter() - t0
    summary = stream_predict(model, source, out, options)
    summary["load_seconds"] = round(load_s, 4)
    return summary
