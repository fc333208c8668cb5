"""``accelcore predict --strategy ray``: one artifact over many images on a Ray Data actor pool.

Ray is an optional execution engine of the predict command, imported only from here (and this
module only when ``--strategy ray`` is given). The image paths become a Ray dataset
(``ray.data.from_items``); ``map_batches`` runs :class:`ArtifactWorker`, an actor class that
loads the artifact once per actor with its threads pinned to the CPUs the actor reserved, and
per batch reads + letterboxes the images, runs the forward at the artifact's batch size, decodes
+ NMS, and writes the annotated images itself (on a cluster, ``--out`` must be a folder every
node reaches under the same path, like the source files). The driver receives the detections in
source order (``preserve_order``) and writes the same ``detections.json`` and summary as the
threaded strategy. Without an address a private local Ray is started and shut down afterwards.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from accelcore.errors import AccelcoreError, ImageReadError, PluginError, one_line
from accelcore.inference.stream import (
    DETECTIONS_JSON,
    JsonListWriter,
    Source,
    StreamOptions,
    _load,
    draw,
    records,
    report_skip,
    stack_batch,
    write_image,
)

INSTALL = "pip install 'accelcore[ray]'"


class ArtifactWorker:
    """The Ray Data UDF: one loaded artifact per actor, called on batches of image rows
    (``position``, ``path``, ``name``); returns one row per input row (``error`` non-empty for
    an unreadable file, ``records`` the image's detections as JSON, per-row stage seconds)."""

    def __init__(self, artifact: str, plugins: list[str], setup: dict[str, Any], out: str | None,
                 conf: float, nms: float, batch_size: int | None) -> None:
        import cv2
        import torch

        from accelcore.inference.artifact import load_artifact
        from accelcore.plugins import get_plugin_manager
        from accelcore.predictor import Predictor
        from accelcore.runtime import RuntimeSetup

        # Threads first: the runtimes read torch's thread count when the artifact loads.
        self.setup = RuntimeSetup(**setup)
        self.setup.apply()
        cv2.setNumThreads(1)
        self.model = load_artifact(artifact, pm=get_plugin_manager(plugins))
        self.batch_size = int(batch_size or self.model.batch_size or 1)
        self.input_size = tuple(int(v) for v in self.model.input_size)
        self.out = Path(out) if out else None
        self.predictor = Predictor(self.model.accelerated, self.model.decoder, raw=True,
                                   conf_thre=conf, nms_thre=nms)
        self.pool = ThreadPoolExecutor(max(1, torch.get_num_threads()),
                                       thread_name_prefix="accelcore-read")
        grey = np.full((*self.input_size, 3), 114, np.uint8)
        with torch.inference_mode():  # warm-up: compiling runtimes build kernels on call one
            self.model.accelerated.forward(
                stack_batch([grey], self.batch_size, self.model.accelerated.input_format))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        positions = [int(p) for p in batch["position"]]
        paths, names = [str(p) for p in batch["path"]], [str(n) for n in batch["name"]]
        keep = self.out is not None
        loaded = list(self.pool.map(
            lambda k: _load(positions[k], names[k], lambda: _read(paths[k]), self.input_size,
                            keep), range(len(paths))))
        n = len(loaded)
        errors = [str(item.error) if item.error is not None else "" for item in loaded]
        found = ["[]"] * n
        counts = [0] * n
        read_s = [item.seconds for item in loaded]
        infer_s, post_s = [0.0] * n, [0.0] * n
        good = [k for k, item in enumerate(loaded) if item.error is None]
        fmt = self.model.accelerated.input_format
        for start in range(0, len(good), self.batch_size):
            chunk = good[start:start + self.batch_size]
            images = stack_batch([loaded[k].canvas for k in chunk], self.batch_size, fmt)
            t0 = time.perf_counter()
            with torch.inference_mode():
                raw = self.model.accelerated.forward(images)
            t1 = time.perf_counter()
            dets_list = self.predictor.detections(raw[:len(chunk)], self.input_size)
            for k, dets in zip(chunk, dets_list, strict=True):
                item = loaded[k]
                dets = np.asarray(dets, dtype=np.float32).copy()
                dets[:, :4] /= item.ratio
                counts[k] = len(dets)
                found[k] = json.dumps(records(item.name, dets, self.model.class_names))
                if self.out is not None:
                    write_image(self.out / item.name, draw(item.image, dets,
                                                           self.model.class_names))
                item.image = item.canvas = None
            t2 = time.perf_counter()
            for k in chunk:  # the batch's time shared by its images, so sums stay right
                infer_s[k] = (t1 - t0) / len(chunk)
                post_s[k] = (t2 - t1) / len(chunk)
        return {"position": np.array(positions, np.int64),
                "name": np.array(names, dtype=object),
                "error": np.array(errors, dtype=object),
                "records": np.array(found, dtype=object),
                "detections": np.array(counts, np.int64),
                "read_s": np.array(read_s), "infer_s": np.array(infer_s),
                "post_s": np.array(post_s)}


def _read(path: str) -> np.ndarray:
    from accelcore.data.preprocess import read_image

    return read_image(path)


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data ships in a separate extra
    except ImportError as exc:
        raise PluginError(f"--strategy ray: {one_line(exc)}; install it with {INSTALL}") from None
    return ray


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _ray_error(exc: BaseException) -> AccelcoreError:
    cause = getattr(exc, "cause", None)  # RayTaskError carries the actor's own exception
    inner = cause if isinstance(cause, BaseException) else exc
    if isinstance(inner, AccelcoreError):
        return inner
    return AccelcoreError(f"--strategy ray: {one_line(inner)}")


def ray_predict(artifact: str | Path, source: Source, out: Path | None,
                options: StreamOptions | None = None, *, setup: Any = None,
                plugins: list[str] | None = None, address: str | None = None,
                workers: int | None = None, cpus_per_worker: int | None = None) -> dict[str, Any]:
    """Predict on ``source``'s images with an actor pool of ``workers`` actors of
    ``cpus_per_worker`` CPUs (= their threads) each; same outputs and summary keys as
    :func:`accelcore.inference.stream.stream_predict` (``strategy: "ray"``)."""
    import dataclasses

    from accelcore.inference.artifact import read_manifest
    from accelcore.runtime import RuntimeSetup, describe_runtime

    options = options or StreamOptions()
    if source.video is not None:
        raise AccelcoreError("--strategy ray: takes images (a folder, glob or .txt list), not "
                             "a video; predict a video with the default strategy")
    folder, manifest = read_manifest(artifact)  # a clear error before Ray starts
    batch_size = int(options.batch_size or manifest.get("batch_size") or 1)
    per = int(cpus_per_worker or 1)
    setup = dataclasses.replace(setup or RuntimeSetup(), threads=per)
    env = setup.env()  # names a missing allocator library before Ray starts
    ray = _import_ray()
    owns_ray = not ray.is_initialized()
    if owns_ray:
        if address:
            ray.init(address=address, runtime_env={"env_vars": env})
        else:
            # address="local": a private instance, never someone else's Ray on this host.
            count = workers or max(1, _usable_cores() // per)
            ray.init(address="local", num_cpus=count * per, include_dashboard=False,
                     runtime_env={"env_vars": env})
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    writer = None
    try:
        cpus = int(ray.cluster_resources().get("CPU", per))
        workers = workers or max(1, cpus // per)
        context.execution_options.preserve_order = True  # detections.json in source order
        context.enable_progress_bars = False
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            writer = JsonListWriter(out / DETECTIONS_JSON)
        items = [{"position": i, "path": str(Path(f).resolve()), "name": name}
                 for i, (f, name) in enumerate(zip(source.files, source.names, strict=True))]
        dataset = ray.data.from_items(
            items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
        mapped = dataset.map_batches(
            ArtifactWorker, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=per,
            fn_constructor_kwargs={
                "artifact": str(folder.resolve()), "plugins": list(plugins or []),
                "setup": dataclasses.asdict(setup),
                "out": str(out.resolve()) if out is not None else None,
                "conf": options.conf, "nms": options.nms, "batch_size": batch_size})
        summary = _collect(mapped, options, writer, workers)
    finally:
        if writer is not None:
            writer.close()
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        if owns_ray:
            ray.shutdown()
    summary.update(
        source=source.text, kind="images", method=manifest["method"],
        precision=manifest.get("precision"), input_format=manifest.get("input_format",
                                                                         "float32_nchw"),
        input_size=list(manifest["input_size"]), batch_size=batch_size,
        saved=out is not None, runtime=describe_runtime(), address=address or "local",
        workers=workers, cpus_per_worker=per,
        outputs={"folder": str(out), "detections": str(out / DETECTIONS_JSON)} if out else {})
    return summary


def _collect(mapped: Any, options: StreamOptions, writer: JsonListWriter | None,
             workers: int) -> dict[str, Any]:
    """Consume the rows in source order: skip or stop on errors, write records, sum times."""
    busy = {"read": 0.0, "infer": 0.0, "post": 0.0}
    images = detections = 0
    skipped: list[str] = []
    started = time.perf_counter()
    first_row_s = None
    try:
        for row in mapped.iter_rows():
            if first_row_s is None:
                first_row_s = time.perf_counter() - started
            for stage in busy:
                busy[stage] += float(row[f"{stage}_s"])
            error = str(row["error"])
            if error:
                if options.fail_fast:
                    raise ImageReadError(f"{error}; stopped (--fail-fast)", str(row["name"]))
                skipped.append(str(row["name"]))
                report_skip(error)
                continue
            images += 1
            detections += int(row["detections"])
            if writer is not None:
                writer.add(json.loads(str(row["records"])))
    except AccelcoreError:
        raise
    except Exception as exc:  # an actor failed (artifact would not load, a worker died, …)
        raise _ray_error(exc) from None
    seconds = time.perf_counter() - started
    if images == 0:
        raise AccelcoreError(f"--strategy ray: no image could be read ({len(skipped)} skipped)")
    img_per_s = images / seconds if seconds > 0 else float("inf")
    # Forward-only rate of the pool: every actor's images over its own forward time, summed
    # (actors get equal shares of the batches).
    model_rate = workers * images / busy["infer"] if busy["infer"] > 0 else None
    return {
        "strategy": "ray",
        "images": images,
        "skipped": len(skipped),
        "skipped_files": skipped,
        "detections": detections,
        "seconds": round(seconds, 4),
        "startup_seconds": round(first_row_s or 0.0, 4),
        "img_per_s": round(img_per_s, 2),
        "model_img_per_s": round(model_rate, 2) if model_rate else None,
        "model_ms_per_batch": None,
        "e2e_vs_model": round(img_per_s / model_rate, 3) if model_rate else None,
        "stage_seconds": {k: round(v, 4) for k, v in busy.items()},
    }
