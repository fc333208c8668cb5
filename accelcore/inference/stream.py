"""Streaming prediction over image files or a video: read, infer and post-process overlapped.

Three stages run at once, joined by bounded queues, so memory stays bounded however long the
source is and the forward never waits for JPEG decoding it could overlap with:

* **read** — a small thread pool reads, decodes (OpenCV releases the GIL) and letterboxes;
  results are taken in submission order, so the order of the source is kept while decodes
  overlap. A batch is stacked as uint8 NHWC (what the letterbox produces) and converted once,
  on this stage, to the artifact's native input format (``AcceleratedModel.input_format``): a
  runtime that takes uint8 NHWC gets the stacked canvases with no float pass at all.
* **infer** — one thread runs the artifact's native forward, one batch at a time, always at the
  artifact's batch size (a short last batch is padded, so shape-specialised runtimes never
  recompile).
* **post** — the calling thread decodes the raw output and runs NMS
  (:meth:`accelcore.predictor.Predictor.detections`, the detector's own decode), maps boxes to
  original pixels, appends COCO-style records to the detections json as it goes, and hands
  drawing + encoding of annotated images to the pool (video frames are drawn and written in
  order here).

The summary carries the end-to-end rate, the forward-only rate of the same artifact on the same
batch measured in the same run (``model_img_per_s``, :func:`~accelcore.inference.latency.
measure_latency` on a preloaded batch of the decoded images), and each stage's busy time.
Nothing here knows the model or the backend: the artifact's forward, input format and decoder
are all it uses.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accelcore.data.preprocess import PAD_VALUE, letterbox_hwc, read_image
from accelcore.errors import AccelcoreError, ImageReadError
from accelcore.inference.image_format import UINT8_NHWC, to_format
from accelcore.runtime import INPUT_NICE, lower_priority

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXT = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v"}
LIST_EXT = {".txt"}
DETECTIONS_JSON = "detections.json"


# ---------------------------------------------------------------- sources


@dataclass
class Source:
    """What to predict on: image files (``files``, output names ``names``) or one ``video``."""

    text: str
    files: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    video: Path | None = None

    @property
    def kind(self) -> str:
        return "video" if self.video is not None else "images"


def relative_names(files: list[Path]) -> list[str]:
    """Output names: paths relative to the files' common folder (plain names for one folder)."""
    if not files:
        return []
    parents = [str(f.resolve().parent) for f in files]
    root = Path(os.path.commonpath(parents))
    return [f.resolve().relative_to(root).as_posix() for f in files]


def resolve_source(text: str) -> Source:
    """``--source``: an image, a folder of images, a glob (quote it), a ``.txt`` list of image
    paths (one per line, relative to the list's folder; ``#`` comments) or a video file."""
    path = Path(text).expanduser()
    if any(ch in text for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)
                       if Path(p).suffix.lower() in IMAGE_EXT and Path(p).is_file())
        if not files:
            raise AccelcoreError(f"--source: no images ({', '.join(sorted(IMAGE_EXT))}) match "
                                 f"{text}")
    elif not path.exists():
        raise AccelcoreError(f"--source: not found: {path}")
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXT)
        if not files:
            raise AccelcoreError(f"--source: no images ({', '.join(sorted(IMAGE_EXT))}) in "
                                 f"{path}")
    elif path.suffix.lower() in VIDEO_EXT:
        return Source(text, video=path)
    elif path.suffix.lower() in LIST_EXT:
        lines = [line.strip() for line in path.read_text().splitlines()]
        files = [(path.parent / line).expanduser() for line in lines
                 if line and not line.startswith("#")]
        if not files:
            raise AccelcoreError(f"--source: the list {path} names no image")
    else:
        files = [path]
    return Source(text, files=files, names=relative_names(files))


# ---------------------------------------------------------------- options and summary


@dataclass
class StreamOptions:
    """How to run a stream. ``batch_size``: images per forward (None: the artifact's);
    ``conf``/``nms``: score and IoU thresholds; ``save``: write annotated outputs and the
    detections json (False: timing only); ``fail_fast``: stop at the first unreadable file
    instead of skipping it; ``readers``: decode threads (None: the usable cores, 2 to 4);
    ``queue_batches``: batches buffered between two stages; ``model_seconds``: minimum wall
    time of the forward-only measurement (0: not measured); ``reader_nice``: how much lower
    the decode threads' scheduling priority is than the runtime's (0: the same; see
    :func:`accelcore.runtime.lower_priority`)."""

    batch_size: int | None = None
    conf: float = 0.3
    nms: float = 0.45
    save: bool = True
    fail_fast: bool = False
    readers: int | None = None
    queue_batches: int = 1
    model_seconds: float = 3.0
    reader_nice: int = INPUT_NICE


def default_readers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 2
    return max(2, min(4, cores))


def report_skip(message: str) -> None:
    """The one line a skipped file gets on stderr."""
    print(f"accelcore: skipped: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- drawing and records


def _colour(index: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(index * 7919 + 1)
    return tuple(int(c) for c in rng.integers(60, 255, size=3))


def draw(image: np.ndarray, dets: np.ndarray, class_names: list[str]) -> np.ndarray:
    """A copy of ``image`` with boxes and "class score" labels drawn."""
    import cv2

    out = image.copy()
    for x1, y1, x2, y2, score, cls in dets:
        c = int(cls)
        colour = _colour(c)
        p1, p2 = (int(round(x1)), int(round(y1))), (int(round(x2)), int(round(y2)))
        cv2.rectangle(out, p1, p2, colour, 2)
        name = class_names[c] if 0 <= c < len(class_names) else str(c)
        label = f"{name} {score:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        top = max(p1[1], th + base + 2)
        cv2.rectangle(out, (p1[0], top - th - base - 2), (p1[0] + tw + 2, top), colour, -1)
        cv2.putText(out, label, (p1[0] + 1, top - base - 1), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return out


def records(name: str, dets: np.ndarray, class_names: list[str],
            frame: int | None = None) -> list[dict]:
    """COCO results-style records of one image: ``image``, ``bbox`` [x, y, w, h] in original
    pixels, ``score``, ``category_id`` (the class index), ``category``; ``frame`` for video."""
    extra = {} if frame is None else {"frame": frame}
    return [{"image": name, **extra,
             "bbox": [round(float(x1), 2), round(float(y1), 2),
                      round(float(x2 - x1), 2), round(float(y2 - y1), 2)],
             "score": round(float(s), 4), "category_id": int(c),
             "category": class_names[int(c)] if 0 <= int(c) < len(class_names) else str(int(c))}
            for x1, y1, x2, y2, s, c in dets]


class JsonListWriter:
    """A JSON list written one record at a time (memory stays flat on long sources)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._file.write("[")
        self._count = 0

    def add(self, items: list[dict]) -> None:
        for item in items:
            self._file.write(("\n" if self._count == 0 else ",\n") + json.dumps(item))
            self._count += 1

    def close(self) -> None:
        if not self._file.closed:
            self._file.write("\n]\n")
            self._file.close()


def write_image(path: Path, image: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise AccelcoreError(f"cannot write {path} (unsupported extension or disk full?)")


# ---------------------------------------------------------------- the stages


@dataclass
class _Item:
    """One image of the source, read and letterboxed (or why it could not be)."""

    position: int
    name: str
    canvas: np.ndarray | None = None
    ratio: float = 1.0
    image: np.ndarray | None = None  # the original, kept only to draw on
    error: ImageReadError | None = None
    seconds: float = 0.0


@dataclass
class _Batch:
    items: list[_Item]
    images: Any  # the padded batch in the artifact's input format


class _Stopped(Exception):
    """Another stage failed: unwind quietly (the first error is the one reported)."""


_END = object()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _get(q: queue.Queue, stop: threading.Event) -> Any:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue


def _load(position: int, name: str, read: Callable[[], np.ndarray],
          input_size: tuple[int, int], keep_image: bool) -> _Item:
    t0 = time.perf_counter()
    try:
        image = read()
    except ImageReadError as exc:
        return _Item(position, name, error=exc, seconds=time.perf_counter() - t0)
    canvas, ratio = letterbox_hwc(image, input_size)
    return _Item(position, name, canvas, ratio, image if keep_image else None,
                 seconds=time.perf_counter() - t0)


def stack_batch(canvases: list[np.ndarray], batch_size: int, input_format: str) -> Any:
    """Letterboxed uint8 HWC canvases as one batch of ``batch_size`` (padding rows filled with
    the letterbox grey) in ``input_format``."""
    h, w = canvases[0].shape[:2]
    batch = np.empty((batch_size, h, w, 3), np.uint8)
    for i, canvas in enumerate(canvases):
        batch[i] = canvas
    batch[len(canvases):] = PAD_VALUE
    tensor = torch.from_numpy(batch)
    return tensor if input_format == UINT8_NHWC else to_format(tensor, input_format)


class StreamRun:
    """One streaming prediction run of a loaded artifact over a :class:`Source`.

    ``model``: an :class:`~accelcore.inference.artifact.LoadedModel` (or anything with its
    ``accelerated``, ``decoder``, ``input_size``, ``batch_size``, ``class_names``, ``method``,
    ``precision``). ``out``: output folder (unused with ``options.save`` False).
    """

    def __init__(self, model: Any, source: Source, out: Path | None,
                 options: StreamOptions | None = None,
                 on_skip: Callable[[str], None] = report_skip) -> None:
        from accelcore.predictor import Predictor

        self.model = model
        self.source = source
        self.options = options or StreamOptions()
        self.out = Path(out) if out is not None else None
        if self.options.save and self.out is None:
            raise ValueError("an output folder is needed unless options.save is False")
        self.on_skip = on_skip
        self.batch_size = max(1, int(self.options.batch_size or model.batch_size or 1))
        self.input_size = tuple(int(v) for v in model.input_size)
        self.input_format = model.accelerated.input_format
        self.forward = model.accelerated.forward  # native entry: no per-call conversion
        self.predictor = Predictor(model.accelerated, model.decoder, raw=True,
                                   conf_thre=self.options.conf, nms_thre=self.options.nms)
        self.readers = self.options.readers or default_readers()
        self.skipped: list[str] = []
        self.images = 0
        self.detections = 0
        self.busy = {"read": 0.0, "infer": 0.0, "post": 0.0}
        self._lock = threading.Lock()  # busy["post"] is also added to by the writer threads
        self.first_batch: Any = None
        self.outputs: dict[str, str] = {}
        self._video_info: dict[str, Any] = {}

    # -- source readers (run on the read stage's thread)
    def _tasks(self) -> Iterator[tuple[str, Callable[[], np.ndarray], float]]:
        """``(name, read, seconds already spent reading)`` per image, in source order."""
        if self.source.video is None:
            for file, name in zip(self.source.files, self.source.names, strict=True):
                yield name, (lambda f=file: read_image(f)), 0.0
            return
        import cv2

        cap = cv2.VideoCapture(str(self.source.video))
        if not cap.isOpened():
            raise AccelcoreError(f"--source: cannot open video {self.source.video}")
        try:
            self._video_info = {"fps": cap.get(cv2.CAP_PROP_FPS) or 25.0}
            stem, index = self.source.video.stem, 0
            while True:
                t0 = time.perf_counter()
                ok, frame = cap.read()
                spent = time.perf_counter() - t0
                if not ok:
                    break
                yield f"{stem}#{index:06d}", (lambda f=frame: f), spent
                index += 1
        finally:
            cap.release()

    def _read_stage(self, pool: ThreadPoolExecutor, out_q: queue.Queue,
                    stop: threading.Event) -> None:
        keep = self.options.save
        depth = self.batch_size + self.readers  # decodes in flight: the pool never idles
        pending: collections.deque[Future] = collections.deque()
        batch: list[_Item] = []

        def take(future: Future) -> None:
            item: _Item = future.result()
            self.busy["read"] += item.seconds
            if item.error is not None:
                if self.options.fail_fast:
                    raise ImageReadError(f"{item.error}; stopped (--fail-fast)",
                                         item.error.path)
                self.skipped.append(item.error.path or item.name)
                self.on_skip(str(item.error))
                return
            batch.append(item)
            if len(batch) == self.batch_size:
                emit()

        def emit() -> None:
            t0 = time.perf_counter()
            images = stack_batch([i.canvas for i in batch], self.batch_size, self.input_format)
            for item in batch:
                item.canvas = None  # stacked: the copy in the batch is the one kept
            self.busy["read"] += time.perf_counter() - t0
            _put(out_q, _Batch(list(batch), images), stop)
            batch.clear()

        for position, (name, read, spent) in enumerate(self._tasks()):
            self.busy["read"] += spent
            pending.append(pool.submit(_load, position, name, read, self.input_size, keep))
            while len(pending) >= depth:
                take(pending.popleft())
            if stop.is_set():
                raise _Stopped
        while pending:
            take(pending.popleft())
        if batch:
            emit()

    def _infer_stage(self, in_q: queue.Queue, out_q: queue.Queue,
                     stop: threading.Event) -> None:
        while True:
            item = _get(in_q, stop)
            if item is _END:
                return
            if self.first_batch is None:
                self.first_batch = item.images
            t0 = time.perf_counter()
            with torch.inference_mode():  # grad mode is per thread
                raw = self.forward(item.images)
                t1 = time.perf_counter()
                # Box decoding and NMS are torch ops: on this thread they share the runtime's
                # OpenMP team instead of starting a second team on another thread that would
                # compete with the model for the same cores.
                found = self.predictor.detections(raw[:len(item.items)], self.input_size)
            self.busy["infer"] += t1 - t0
            self._add_post(time.perf_counter() - t1)
            _put(out_q, (item, found), stop)

    # -- results: scaling, json, annotated images (on the calling thread)
    def _post(self, batch: _Batch, found: list[Any], pool: ThreadPoolExecutor,
              writes: collections.deque[Future], sinks: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        for item, dets in zip(batch.items, found, strict=True):
            dets = np.asarray(dets, dtype=np.float32).copy()
            dets[:, :4] /= item.ratio  # network-input pixels -> original pixels
            self.images += 1
            self.detections += len(dets)
            if not self.options.save:
                continue
            frame = item.position if self.source.video is not None else None
            sinks["json"].add(records(item.name, dets, self.model.class_names, frame))
            if self.source.video is not None:
                sinks["video"](item.image, dets)
            else:
                while len(writes) >= 2 * self.readers:  # bounded: originals wait in memory
                    writes.popleft().result()
                writes.append(pool.submit(self._write_one, item.name, item.image, dets))
            item.image = None
        self._add_post(time.perf_counter() - t0)

    def _add_post(self, seconds: float) -> None:
        with self._lock:
            self.busy["post"] += seconds

    def _write_one(self, name: str, image: np.ndarray, dets: np.ndarray) -> None:
        t0 = time.perf_counter()
        assert self.out is not None
        write_image(self.out / name, draw(image, dets, self.model.class_names))
        self._add_post(time.perf_counter() - t0)

    def _video_sink(self) -> tuple[Callable[[np.ndarray, np.ndarray], None], Callable[[], None]]:
        import cv2

        assert self.out is not None and self.source.video is not None
        target = self.out / f"{self.source.video.stem}_pred.mp4"
        state: dict[str, Any] = {}

        def write(frame: np.ndarray, dets: np.ndarray) -> None:
            if "writer" not in state:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"),
                                         float(self._video_info.get("fps", 25.0)), (w, h))
                if not writer.isOpened():
                    raise AccelcoreError(f"cannot write video {target} (no mp4v encoder in "
                                         "this OpenCV build?)")
                state["writer"] = writer
            state["writer"].write(draw(frame, dets, self.model.class_names))

        def close() -> None:
            if "writer" in state:
                state["writer"].release()

        self.outputs["video"] = str(target)
        return write, close

    # -- the run
    def warm_up(self) -> float:
        """One forward on a grey batch, before the clock starts (compiling runtimes build their
        kernels on the first call); returns its seconds."""
        t0 = time.perf_counter()
        grey = np.full((*self.input_size, 3), PAD_VALUE, np.uint8)
        with torch.inference_mode():
            self.forward(stack_batch([grey], self.batch_size, self.input_format))
        return time.perf_counter() - t0

    def run(self) -> dict[str, Any]:
        """Stream the whole source; returns the summary."""
        import cv2

        sinks: dict[str, Any] = {}
        closers: list[Callable[[], None]] = []
        if self.options.save:
            assert self.out is not None
            self.out.mkdir(parents=True, exist_ok=True)
            sinks["json"] = JsonListWriter(self.out / DETECTIONS_JSON)
            closers.append(sinks["json"].close)
            self.outputs.update(folder=str(self.out), detections=str(sinks["json"].path))
            if self.source.video is not None:
                sinks["video"], close_video = self._video_sink()
                closers.append(close_video)
        warmup_s = self.warm_up()
        stop = threading.Event()
        errors: list[BaseException] = []
        depth = max(1, int(self.options.queue_batches))
        to_infer: queue.Queue = queue.Queue(depth)
        to_post: queue.Queue = queue.Queue(depth)
        # OpenCV's own thread pool inside each resize would compete with our decode threads
        # and the runtime's threads for the same cores; one thread per call, restored after.
        cv2_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        pool = ThreadPoolExecutor(self.readers, thread_name_prefix="accelcore-read",
                                  initializer=lower_priority, initargs=(self.options.reader_nice,))
        writes: collections.deque[Future] = collections.deque()

        def stage(fn: Callable[..., None], *args: Any, out_q: queue.Queue) -> None:
            try:
                fn(*args)
                _put(out_q, _END, stop)
            except _Stopped:
                pass
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                errors.append(exc)
                stop.set()

        threads = [
            threading.Thread(target=stage, args=(self._read_stage, pool, to_infer, stop),
                             kwargs={"out_q": to_infer}, name="accelcore-read", daemon=True),
            threading.Thread(target=stage, args=(self._infer_stage, to_infer, to_post, stop),
                             kwargs={"out_q": to_post}, name="accelcore-infer", daemon=True),
        ]
        started = time.perf_counter()
        try:
            for thread in threads:
                thread.start()
            while True:
                item = _get(to_post, stop)
                if item is _END:
                    break
                self._post(*item, pool, writes, sinks)
            while writes:
                writes.popleft().result()
        except _Stopped:
            pass
        except BaseException as exc:
            errors.insert(0, exc)
            stop.set()
        finally:
            stop.set()  # a no-op for stages that finished; ends the others
            for thread in threads:
                thread.join()
            pool.shutdown(wait=True, cancel_futures=True)
            cv2.setNumThreads(cv2_threads)
            for close in closers:
                close()
        if errors:
            raise errors[0]
        seconds = time.perf_counter() - started
        if self.images == 0:
            raise AccelcoreError(f"--source {self.source.text}: no image could be read "
                                 f"({len(self.skipped)} skipped)")
        return self._summary(seconds, warmup_s)

    def measure_model(self) -> dict[str, Any] | None:
        """The forward alone on the first batch of this run (preloaded, native format)."""
        from accelcore.inference.latency import measure_latency

        if self.first_batch is None or self.options.model_seconds <= 0:
            return None
        with torch.inference_mode():
            return measure_latency(self.forward, self.first_batch, warmup=1, min_runs=3,
                                   min_seconds=self.options.model_seconds)

    def _summary(self, seconds: float, warmup_s: float) -> dict[str, Any]:
        from accelcore.runtime import describe_runtime

        model = self.measure_model()
        img_per_s = self.images / seconds if seconds > 0 else float("inf")
        model_rate = model["img_per_s"] if model else None
        return {
            "strategy": "threads",
            "source": self.source.text,
            "kind": self.source.kind,
            "method": self.model.method,
            "precision": self.model.precision,
            "input_format": self.input_format,
            "input_size": list(self.input_size),
            "batch_size": self.batch_size,
            "images": self.images,
            "skipped": len(self.skipped),
            "skipped_files": list(self.skipped),
            "detections": self.detections,
            "seconds": round(seconds, 4),
            "img_per_s": round(img_per_s, 2),
            "model_img_per_s": round(model_rate, 2) if model_rate else None,
            "model_ms_per_batch": round(model["median_ms"], 2) if model else None,
            "e2e_vs_model": round(img_per_s / model_rate, 3) if model_rate else None,
            "stage_seconds": {k: round(v, 4) for k, v in self.busy.items()},
            "warmup_seconds": round(warmup_s, 4),
            "readers": self.readers,
            "saved": self.options.save,
            "outputs": dict(self.outputs),
            "runtime": describe_runtime(),
        }


def stream_predict(model: Any, source: Source, out: Path | None,
                   options: StreamOptions | None = None,
                   on_skip: Callable[[str], None] = report_skip) -> dict[str, Any]:
    """Predict on every image (or frame) of ``source`` with a loaded artifact; write annotated
    outputs + ``detections.json`` into ``out`` (unless ``options.save`` is False) and return
    the summary. Unreadable files are reported through ``on_skip`` and counted, or stop the run
    with :class:`~accelcore.errors.ImageReadError` under ``options.fail_fast``."""
    return StreamRun(model, source, out, options, on_skip).run()


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the few lines ``accelcore predict`` prints."""
    stages = summary.get("stage_seconds") or {}
    model = summary.get("model_img_per_s")
    ratio = summary.get("e2e_vs_model")
    lines = [
        f"accelcore: {summary['method']} ({summary['precision']}, {summary['input_format']}, "
        f"batch {summary['batch_size']}, {summary['strategy']}): {summary['images']} image(s) "
        f"in {summary['seconds']:.2f} s = {summary['img_per_s']:.1f} img/s end to end",
        "           model alone " + (f"{model:.1f} img/s (same batch, preloaded); end to end = "
                                     f"{100 * ratio:.0f}% of it" if model and ratio else
                                     "not measured"),
        "           stage busy s: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
        + f"; skipped {summary['skipped']} unreadable file(s)",
    ]
    outputs = summary.get("outputs") or {}
    if outputs:
        lines.append("           outputs -> " + ", ".join(f"{v}" for k, v in outputs.items()
                                                          if k != "folder"))
    return "\n".join(lines)
