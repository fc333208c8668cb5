"""Streaming prediction (accelcore/inference/stream.py, accelcore predict): order, bounded
read-ahead, native input format, bad files (skip / fail-fast), video in/out, the summary, and the
Ray Data path on a local 2-worker cluster."""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from accelcore.errors import AccelcoreError, ImageReadError
from accelcore.inference import stream
from accelcore.inference.image_format import FLOAT_NCHW, UINT8_NHWC
from accelcore.inference.stream import Source, StreamOptions, resolve_source, stream_predict
from accelcore.interfaces import AcceleratedModel

SIZE = 32  # fake-model input (H = W); images are written at this size, so ratio = 1


# ---------------------------------------------------------------- a fake artifact


class EchoDecoder:
    """Detector decode/postprocess for the echo forward: the raw output already is one
    ``x1, y1, x2, y2, score, class`` row per image."""

    def decode(self, raw: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        assert tuple(input_hw) == (SIZE, SIZE)
        return raw

    def postprocess(self, decoded: torch.Tensor, conf: float, nms: float) -> list[np.ndarray]:
        return [row.numpy().reshape(1, 6) for row in decoded[:, 0]]


def echo_model(input_format: str = UINT8_NHWC, batch_size: int = 4,
               calls: list | None = None, delay: float = 0.0) -> SimpleNamespace:
    """A loaded-artifact stand-in whose forward reports each image's top-left pixel value (the
    image's index, see :func:`write_indexed`) as the x of its one box."""

    def forward(images: torch.Tensor) -> torch.Tensor:
        if input_format == UINT8_NHWC:
            assert images.dtype == torch.uint8 and images.shape[1:] == (SIZE, SIZE, 3)
            value = images[:, 0, 0, 0].float()
        else:
            assert images.dtype == torch.float32 and images.shape[1:] == (3, SIZE, SIZE)
            value = images[:, 0, 0, 0]
        if calls is not None:
            calls.append(images.shape[0])
        if delay:
            time.sleep(delay)
        out = torch.zeros(images.shape[0], 1, 6)
        out[:, 0, 0] = value
        out[:, 0, 1] = 1.0
        out[:, 0, 2] = value + 4
        out[:, 0, 3] = 5.0
        out[:, 0, 4] = 0.9
        return out

    accelerated = AcceleratedModel(method="echo", precision="fp32", forward=forward,
                                   input_format=input_format)
    return SimpleNamespace(accelerated=accelerated, decoder=EchoDecoder(),
                           input_size=(SIZE, SIZE), batch_size=batch_size, class_names=["x"],
                           method="echo", precision="fp32")


def pixel(index: int) -> int:
    """A flat value that survives JPEG: well apart for neighbouring indices."""
    return 20 + 4 * index


def write_indexed(folder: Path, count: int, ext: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        path = folder / f"img{i:03d}{ext}"
        cv2.imwrite(str(path), np.full((SIZE, SIZE, 3), pixel(i), np.uint8))
        files.append(path)
    return files


def xs(detections_json: Path) -> list[float]:
    return [r["bbox"][0] for r in json.loads(detections_json.read_text())]


# ---------------------------------------------------------------- order, format, bounds


@pytest.mark.parametrize("input_format", [UINT8_NHWC, FLOAT_NCHW])
def test_order_kept_under_random_decode_delays(tmp_path, monkeypatch, input_format):
    files = write_indexed(tmp_path / "src", 30)
    plain_read = stream.read_image
    rng = random.Random(0)
    delays = {str(f): rng.uniform(0.0, 0.02) for f in files}

    def slow_read(path):  # later files often finish first
        time.sleep(delays[str(path)])
        return plain_read(path)

    monkeypatch.setattr(stream, "read_image", slow_read)
    calls: list[int] = []
    summary = stream_predict(echo_model(input_format, batch_size=4, calls=calls),
                             resolve_source(str(tmp_path / "src")), tmp_path / "out",
                             StreamOptions(readers=4, model_seconds=0.0, conf=0.0),
                             on_skip=lambda line: None)
    assert summary["images"] == 30 and summary["skipped"] == 0
    assert xs(tmp_path / "out" / "detections.json") == [pixel(i) for i in range(30)]
    names = [r["image"] for r in json.loads((tmp_path / "out" / "detections.json").read_text())]
    assert names == [f.name for f in files]
    # Every forward got a full batch: the last one (30 = 7 x 4 + 2) padded, plus the warm-up.
    assert calls == [4] * 9
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [f.name for f in files]


def test_read_ahead_is_bounded(tmp_path, monkeypatch):
    """With a slow forward the reader must wait, not decode the whole source ahead."""
    write_indexed(tmp_path / "src", 48)
    reads = 0
    lock = threading.Lock()
    plain_read = stream.read_image

    def counting_read(path):
        nonlocal reads
        with lock:
            reads += 1
        return plain_read(path)

    reads_at_call: list[int] = []

    def record(_batch: int) -> None:
        reads_at_call.append(reads)

    monkeypatch.setattr(stream, "read_image", counting_read)
    model = echo_model(batch_size=2, delay=0.03)
    inner = model.accelerated.forward

    def forward(images):
        record(images.shape[0])
        return inner(images)

    model.accelerated.forward = forward
    stream_predict(model, resolve_source(str(tmp_path / "src")), None,
                   StreamOptions(save=False, readers=2, model_seconds=0.0))
    timed = reads_at_call[1:]  # [0] is the warm-up
    # batch k in the forward: k + 1 batches handed over, one queued, one being stacked, and
    # batch + readers decodes in flight — never the whole source.
    for k, count in enumerate(timed):
        assert count <= (k + 3) * 2 + 2 + 2, (k, count, timed)
    assert timed[0] < 48


@pytest.mark.skipif(not hasattr(os, "getpriority") or not sys.platform.startswith("linux"),
                    reason="per-thread nice values are a Linux property")
def test_decode_threads_yield_to_the_runtime(tmp_path, monkeypatch):
    """The readers run at a lower priority (higher nice) than the calling thread; the calling
    thread (and so the runtime's threads it starts) keeps its own."""
    write_indexed(tmp_path / "src", 6)
    plain_read = stream.read_image
    seen: list[int] = []

    def reporting_read(path):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return plain_read(path)

    monkeypatch.setattr(stream, "read_image", reporting_read)
    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    for nice, expected in ((7, min(19, main_nice + 7)), (0, main_nice)):
        seen.clear()
        stream_predict(echo_model(batch_size=2), resolve_source(str(tmp_path / "src")), None,
                       StreamOptions(save=False, readers=2, model_seconds=0.0,
                                     reader_nice=nice))
        assert seen and set(seen) == {expected}, (nice, seen)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice


def test_boxes_are_decoded_on_the_inference_thread(tmp_path, monkeypatch):
    """Decoding and NMS (torch ops) run where the forward runs: from any other thread they
    would start a second OpenMP team competing with the runtime's for the same cores."""
    write_indexed(tmp_path / "src", 6)
    model = echo_model(batch_size=2)
    seen: list[str] = []
    plain = model.decoder.postprocess

    def reporting(decoded, conf, nms):
        seen.append(threading.current_thread().name)
        return plain(decoded, conf, nms)

    monkeypatch.setattr(model.decoder, "postprocess", reporting)
    summary = stream_predict(model, resolve_source(str(tmp_path / "src")), None,
                             StreamOptions(save=False, readers=2, model_seconds=0.0))
    assert summary["images"] == 6
    assert seen == ["accelcore-infer"] * 3


def test_summary_fields_and_no_save(tmp_path):
    write_indexed(tmp_path / "src", 10)
    out = tmp_path / "out"
    summary = stream_predict(echo_model(), resolve_source(str(tmp_path / "src")), None,
                             StreamOptions(save=False, model_seconds=0.2))
    assert not out.exists()
    for key in ("images", "seconds", "img_per_s", "model_img_per_s", "model_ms_per_batch",
                "e2e_vs_model", "stage_seconds", "skipped", "skipped_files", "warmup_seconds",
                "batch_size", "input_format", "method", "runtime"):
        assert key in summary, key
    assert summary["images"] == 10 and summary["skipped"] == 0
    assert summary["seconds"] > 0 and summary["img_per_s"] > 0
    assert summary["model_img_per_s"] > 0
    assert summary["e2e_vs_model"] == pytest.approx(summary["img_per_s"]
                                                    / summary["model_img_per_s"], abs=1e-3)
    assert set(summary["stage_seconds"]) == {"read", "infer", "post"}
    assert all(v >= 0 for v in summary["stage_seconds"].values())
    assert summary["input_format"] == UINT8_NHWC and summary["outputs"] == {}
    text = stream.format_summary(summary)
    assert "img/s end to end" in text and "model alone" in text


# ---------------------------------------------------------------- bad files


def add_bad_files(folder: Path) -> list[Path]:
    bad = [folder / "img005_bad.jpg", folder / "img010_empty.png"]
    bad[0].write_bytes(b"this is not a jpeg")
    bad[1].write_bytes(b"")
    return bad


def test_bad_files_are_reported_skipped_and_counted(tmp_path):
    write_indexed(tmp_path / "src", 12)
    bad = add_bad_files(tmp_path / "src")
    lines: list[str] = []
    summary = stream_predict(echo_model(), resolve_source(str(tmp_path / "src")),
                             tmp_path / "out", StreamOptions(model_seconds=0.0),
                             on_skip=lines.append)
    assert summary["images"] == 12 and summary["skipped"] == 2
    assert [Path(p).name for p in summary["skipped_files"]] == [b.name for b in bad]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "img005_bad.jpg" in lines[0] and "cannot decode" in lines[0]
    assert "img010_empty.png" in lines[1] and "empty file" in lines[1]
    assert xs(tmp_path / "out" / "detections.json") == [pixel(i) for i in range(12)]


def test_fail_fast_stops_naming_the_file(tmp_path):
    write_indexed(tmp_path / "src", 12)
    add_bad_files(tmp_path / "src")
    with pytest.raises(ImageReadError, match=r"img005_bad\.jpg.*--fail-fast") as info:
        stream_predict(echo_model(), resolve_source(str(tmp_path / "src")), tmp_path / "out",
                       StreamOptions(fail_fast=True, model_seconds=0.0))
    assert info.value.path.endswith("img005_bad.jpg")
    # No thread is left behind by the stopped run.
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name.startswith("accelcore-")]


def test_a_source_of_only_bad_files_is_an_error(tmp_path):
    (tmp_path / "src").mkdir()
    add_bad_files(tmp_path / "src")
    with pytest.raises(AccelcoreError, match="no image could be read"):
        stream_predict(echo_model(), resolve_source(str(tmp_path / "src")), None,
                       StreamOptions(save=False, model_seconds=0.0), on_skip=lambda x: None)


def test_forward_error_propagates_and_stops(tmp_path):
    write_indexed(tmp_path / "src", 20)
    model = echo_model()
    calls = {"n": 0}
    inner = model.accelerated.forward

    def failing(images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("runtime exploded")
        return inner(images)

    model.accelerated.forward = failing
    with pytest.raises(RuntimeError, match="runtime exploded"):
        stream_predict(model, resolve_source(str(tmp_path / "src")), None,
                       StreamOptions(save=False, model_seconds=0.0))


# ---------------------------------------------------------------- sources


def test_resolve_source_forms(tmp_path):
    files = write_indexed(tmp_path / "a", 3, ".jpg")
    write_indexed(tmp_path / "b" / "c", 2, ".jpg")
    single = resolve_source(str(files[0]))
    assert single.files == [files[0]] and single.names == ["img000.jpg"]
    globbed = resolve_source(str(tmp_path / "**" / "*.jpg"))
    assert len(globbed.files) == 5
    assert "a/img000.jpg" in globbed.names and "b/c/img001.jpg" in globbed.names
    listing = tmp_path / "list.txt"
    listing.write_text("# two files\na/img002.jpg\n\nb/c/img000.jpg\n")
    listed = resolve_source(str(listing))
    assert listed.files == [tmp_path / "a" / "img002.jpg", tmp_path / "b" / "c" / "img000.jpg"]
    with pytest.raises(AccelcoreError, match="not found"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(AccelcoreError, match="no images"):
        resolve_source(str(tmp_path / "*.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AccelcoreError, match="no images"):
        resolve_source(str(tmp_path / "empty"))


# ---------------------------------------------------------------- video


def write_video(path: Path, frames: int, size: tuple[int, int] = (48, 40)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), pixel(i * 5), np.uint8))
    writer.release()


def test_video_in_annotated_video_out(tmp_path):
    video = tmp_path / "clip.mp4"
    write_video(video, 7)
    source = resolve_source(str(video))
    assert source.kind == "video"
    summary = stream_predict(echo_model(batch_size=3), source, tmp_path / "out",
                             StreamOptions(model_seconds=0.0))
    assert summary["images"] == 7 and summary["kind"] == "video"
    target = Path(summary["outputs"]["video"])
    assert target == tmp_path / "out" / "clip_pred.mp4" and target.is_file()
    cap = cv2.VideoCapture(str(target))
    count, shape = 0, None
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        count, shape = count + 1, frame.shape
    cap.release()
    assert count == 7 and shape == (40, 48, 3)
    recs = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [r["frame"] for r in recs] == list(range(7))
    assert recs[3]["image"] == "clip#000003"


def test_unreadable_video_is_a_clear_error(tmp_path):
    video = tmp_path / "broken.mp4"
    video.write_bytes(b"no video here")
    with pytest.raises(AccelcoreError, match=r"cannot open video .*broken\.mp4"):
        stream_predict(echo_model(), resolve_source(str(video)), None,
                       StreamOptions(save=False, model_seconds=0.0))


# ---------------------------------------------------------------- a real artifact, the CLI


@pytest.fixture(scope="module")
def shipped_artifact(tmp_path_factory) -> Path:
    """The shipped checkpoint as an ``original`` artifact at 128 px, batch 4."""
    from accelcore.build import build_detector
    from accelcore.config import ModelConfig
    from accelcore.inference.artifact import save_artifact
    from accelcore.interfaces import AccelerateRequest
    from accelcore.plugins import get_plugin_manager

    repo = Path(__file__).resolve().parents[1]
    pm = get_plugin_manager()
    model = build_detector(pm, ModelConfig(name="yolox_nano", num_classes=8,
                                           input_size=[128, 128], checkpoint=str(
                                               repo / "checkpoints" / "yolox_nano_synthetic.pth")))
    model.eval()
    model.output_mode = "raw"
    folder = tmp_path_factory.mktemp("artifact")
    request = AccelerateRequest(batch_size=4, input_size=(128, 128), work_dir=folder / "work")
    accelerated = pm.hook.accelcore_accelerate(method="original", model=model, request=request)
    return save_artifact(folder / "original", accelerated, {
        "input_size": [128, 128], "batch_size": 4, "input_format": accelerated.input_format,
        "model": {"name": "yolox_nano", "num_classes": 8},
        "class_names": [f"c{i}" for i in range(8)]})


def synthetic_images(folder: Path, count: int) -> list[Path]:
    from accelcore.data.synthetic import class_table, render_image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    files = []
    for i in range(count):
        image, _ = render_image(rng, 160, class_table(8))
        files.append(folder / f"s{i:02d}.jpg")
        cv2.imwrite(str(files[-1]), image)
    return files


def test_cli_predict_with_an_original_artifact(shipped_artifact, tmp_path, capsys):
    from accelcore.cli import main

    files = synthetic_images(tmp_path / "src", 9)
    (tmp_path / "src" / "s04_corrupt.jpg").write_bytes(b"\xff\xd8 broken")
    out, summary_file = tmp_path / "pred", tmp_path / "summary.json"
    code = main(["predict", "--model", str(shipped_artifact), "--source", str(tmp_path / "src"),
                 "--out", str(out), "--json", str(summary_file), "--conf", "0.1",
                 "--model-seconds", "0.3", "--threads", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    skipped_lines = [ln for ln in captured.err.splitlines() if ln.startswith("accelcore: skipped")]
    assert len(skipped_lines) == 1 and "s04_corrupt.jpg" in skipped_lines[0]
    assert "img/s end to end" in captured.out
    summary = json.loads(summary_file.read_text())
    assert summary["images"] == 9 and summary["skipped"] == 1
    assert summary["method"] == "original" and summary["batch_size"] == 4
    assert summary["model_img_per_s"] > 0 and summary["load_seconds"] > 0
    assert summary["runtime"]["threads"] == 2
    assert sorted(p.name for p in out.glob("*.jpg")) == [f.name for f in files]
    recs = json.loads((out / "detections.json").read_text())
    assert recs, "the shipped model finds the synthetic shapes"
    assert set(recs[0]) == {"image", "bbox", "score", "category_id", "category"}
    order = [f.name for f in files]
    assert [order.index(r["image"]) for r in recs] == sorted(order.index(r["image"])
                                                             for r in recs)

    # The same detections as LoadedModel.predict, image by image.
    import accelcore

    loaded = accelcore.load(shipped_artifact)
    expected = loaded.predict([cv2.imread(str(f)) for f in files], conf=0.1, nms=0.45)
    for f, dets in zip(files, expected, strict=True):
        mine = [r for r in recs if r["image"] == f.name]
        assert len(mine) == len(dets)
        for rec, det in zip(mine, dets, strict=True):
            assert rec["bbox"][0] == pytest.approx(float(det[0]), abs=0.05)
            assert rec["score"] == pytest.approx(float(det[4]), abs=1e-3)

    # --fail-fast: exit 2, one line naming the file.
    code = main(["predict", "--model", str(shipped_artifact), "--source", str(tmp_path / "src"),
                 "--out", str(tmp_path / "pred2"), "--fail-fast", "--model-seconds", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("accelcore: error: cannot decode image ")
    assert "s04_corrupt.jpg" in err[-1] and "--fail-fast" in err[-1]


def test_cli_rejects_ray_options_without_ray_strategy(capsys):
    from accelcore.cli import main

    assert main(["predict", "--model", "x", "--source", "y", "--workers", "2"]) == 2
    assert "only with --strategy ray" in capsys.readouterr().err


# ---------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_strategy_on_a_local_two_worker_cluster(shipped_artifact, tmp_path):
    pytest.importorskip("ray")
    from accelcore.inference.stream_ray import ray_predict

    files = synthetic_images(tmp_path / "src", 10)
    (tmp_path / "src" / "s05_bad.jpg").write_bytes(b"nope")
    source = resolve_source(str(tmp_path / "src"))
    skipped: list[str] = []
    threads = stream_predict(__import__("accelcore").load(shipped_artifact), source,
                             tmp_path / "threads", StreamOptions(conf=0.1, model_seconds=0.0),
                             on_skip=skipped.append)
    summary = ray_predict(shipped_artifact, source, tmp_path / "ray",
                          StreamOptions(conf=0.1), workers=2, cpus_per_worker=1)
    assert summary["strategy"] == "ray" and summary["workers"] == 2
    assert summary["images"] == 10 and summary["skipped"] == 1
    assert summary["skipped_files"] == ["s05_bad.jpg"]
    assert summary["img_per_s"] > 0 and summary["model_img_per_s"] > 0
    assert set(summary["stage_seconds"]) == {"read", "infer", "post"}
    assert sorted(p.name for p in (tmp_path / "ray").glob("*.jpg")) == [f.name for f in files]
    ray_recs = json.loads((tmp_path / "ray" / "detections.json").read_text())
    thread_recs = json.loads((tmp_path / "threads" / "detections.json").read_text())
    # Same artifact, same images, same order; 1 thread per actor vs 2 here: last-bit noise only.
    assert [r["image"] for r in ray_recs] == [r["image"] for r in thread_recs]
    for a, b in zip(ray_recs, thread_recs, strict=True):
        assert a["category_id"] == b["category_id"]
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=0.05)
        assert a["score"] == pytest.approx(b["score"], abs=1e-3)
    assert threads["images"] == 10

    with pytest.raises(ImageReadError, match=r"s05_bad\.jpg.*--fail-fast"):
        ray_predict(shipped_artifact, source, None, StreamOptions(fail_fast=True),
                    workers=2, cpus_per_worker=1)


def test_ray_strategy_refuses_video(tmp_path, shipped_artifact):
    from accelcore.inference.stream_ray import ray_predict

    with pytest.raises(AccelcoreError, match="not a video"):
        ray_predict(shipped_artifact, Source("clip.mp4", video=tmp_path / "clip.mp4"), None)
