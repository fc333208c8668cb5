"""Reporters: md / json / png from a results dict."""

from __future__ import annotations

import json

import accelcore_reports as reports

RESULTS = {
    "recipe": "demo", "batch_size": 64, "input_size": [416, 416], "selected": "fast",
    "selection_reason": "fastest within 1 AP", "machine": {"cpu": "X", "flags": {"avx2": True}},
    "versions": {"torch": "2.13.0"},
    "methods": [
        {"method": "original", "status": "ok", "reason": "", "latency_ms": 100.0, "p10_ms": 95.0,
         "p90_ms": 110.0, "img_per_s": 640.0, "speedup": 1.0, "ap50_95": 0.41, "ap50": 0.6,
         "convert_s": 0.1, "size_mb": 3.6, "precision": "fp32", "summary": "eager"},
        {"method": "fast", "status": "ok", "reason": "", "latency_ms": 25.0, "p10_ms": 24.0,
         "p90_ms": 27.0, "img_per_s": 2560.0, "speedup": 4.0, "ap50_95": 0.405, "ap50": 0.6,
         "convert_s": 30.0, "size_mb": 1.2, "precision": "int8", "summary": "int8"},
        {"method": "gone", "status": "unavailable", "reason": "needs X | Y", "latency_ms": None},
    ],
}


def test_every_format_written(tmp_path, capsys):
    paths = reports.accelcore_report(results=RESULTS, run_dir=tmp_path,
                                     formats=["md", "json", "png"])
    assert [p.name for p in paths] == ["report.md", "report.json", "report.png"]
    md = (tmp_path / "report.md").read_text()
    assert "| fast | ok | 25.0 |" in md and "4.00x" in md and "**Selected:** fast" in md
    assert "| gone | unavailable | - |" in md and "needs X / Y" in md  # pipes escaped
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["methods"][1]["speedup"] == 4.0 and data["selected"] == "fast"
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| original | ok |" in capsys.readouterr().out


def test_only_requested_formats(tmp_path):
    assert [p.name for p in reports.accelcore_report(results=RESULTS, run_dir=tmp_path,
                                                     formats=["json"])] == ["report.json"]
    assert not (tmp_path / "report.md").exists()


def test_declares_reporters():
    names = {(d.kind, d.name) for d in reports.accelcore_declare()}
    assert names == {("reporter", "md"), ("reporter", "json"), ("reporter", "png")}
