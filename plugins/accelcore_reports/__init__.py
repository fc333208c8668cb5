"""Reporters: ``md`` (report.md, also printed), ``json`` (report.json), ``png`` (report.png).

Each reporter is a separate ``accelcore_report`` branch keyed by format name, so a recipe's
``report.formats`` chooses which files appear. Missing values print as "-".
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pluggy

from accelcore.interfaces import Declaration

hookimpl = pluggy.HookimplMarker("accelcore")

COLUMNS = (("method", "method", "{}"), ("status", "status", "{}"),
           ("latency_ms", "latency ms", "{:.1f}"), ("p10_ms", "p10", "{:.1f}"),
           ("p90_ms", "p90", "{:.1f}"), ("img_per_s", "img/s", "{:.1f}"),
           ("speedup", "speed-up", "{:.2f}x"), ("ap50_95", "AP50:95", "{:.4f}"),
           ("ap50", "AP50", "{:.4f}"), ("convert_s", "convert s", "{:.1f}"),
           ("size_mb", "size MB", "{:.2f}"), ("precision", "precision", "{}"))


@hookimpl
def accelcore_declare() -> list[Declaration]:
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    return [
        Declaration("reporter", "md", "report.md: method table, selection, machine (printed)"),
        Declaration("reporter", "json", "report.json: the full results"),
        Declaration("reporter", "png", "report.png: speed-up vs AP50:95 scatter, one point per "
                    "method", available=has_mpl, reason="" if has_mpl else "needs matplotlib"),
    ]


def _fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def method_table(methods: list[dict]) -> str:
    """The methods as a Markdown table (failed/unavailable rows carry their reason)."""
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " | note |"
    rule = "|" + "---|" * (len(COLUMNS) + 1)
    lines = [head, rule]
    for row in methods:
        cells = [_fmt(row.get(key), pattern) for key, _, pattern in COLUMNS]
        note = (row.get("reason") or "").replace("|", "/")
        lines.append("| " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    """The whole report as Markdown."""
    out = [f"# accelcore report: {results.get('recipe', 'run')}", ""]
    methods = results.get("methods") or []
    if methods:
        size = results.get("input_size")
        out += [f"Batch {results.get('batch_size')} at {size[0]}x{size[1]}" if size else "",
                "latency = median ms per batch; speed-up vs `original`; AP on COCOeval 0-1 "
                "scale.", "", method_table(methods), ""]
        crit = results.get("accuracy_criterion") or {}
        out.append(f"**Selected:** {results.get('selected') or 'none'} — "
                   f"{results.get('selection_reason', '')}"
                   + (f" (criterion: {crit.get('metric')} {crit.get('kind')} max drop "
                      f"{crit.get('max_drop')})" if crit else ""))
        out.append("")
        summaries = [f"- `{m['method']}`: {m['summary']}" for m in methods if m.get("summary")]
        if summaries:
            out += ["## Methods", *summaries, ""]
    for key in ("train", "validate"):
        section = results.get(key)
        if isinstance(section, dict):
            scalars = {k: v for k, v in section.items() if isinstance(v, (int, float, str))}
            if scalars:
                out += [f"## {key}", *(f"- {k}: {_fmt(v, '{:.4g}') if isinstance(v, float) else v}"
                                       for k, v in scalars.items()), ""]
    machine = results.get("machine")
    if machine:
        flags = ", ".join(f for f, on in (machine.get("flags") or {}).items() if on) or "-"
        out += ["## Machine", f"- CPU: {machine.get('cpu')} ({machine.get('logical_cores')} "
                f"logical cores, {machine.get('accelerate_threads', '?')} threads used)",
                f"- ISA flags: {flags}", ""]
    vers = results.get("versions")
    if vers:
        out += ["## Versions", ", ".join(f"{k} {v}" for k, v in vers.items()), ""]
    return "\n".join(out)


def write_png(results: dict, path: Path) -> Path | None:
    """Speed-up (x) vs AP50:95 (y) scatter of the methods that ran; None if none did."""
    rows = [m for m in results.get("methods") or []
            if m.get("status") == "ok" and m.get("speedup") and m.get("ap50_95") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        for row in rows:
            chosen = row["method"] == results.get("selected")
            ax.scatter(row["speedup"], row["ap50_95"], s=60 if chosen else 30,
                       marker="*" if chosen else "o", zorder=3)
            ax.annotate(row["method"], (row["speedup"], row["ap50_95"]),
                        textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("speed-up vs original (median latency)")
        ax.set_ylabel("COCO AP50:95")
        size = results.get("input_size") or ["?", "?"]
        ax.set_title(f"batch {results.get('batch_size')}, {size[0]}x{size[1]}"
                     f" — selected: {results.get('selected') or 'none'}")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


@hookimpl
def accelcore_report(results: dict, run_dir: Path, formats: list[str]) -> list[Path]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if "md" in formats:
        text = render_markdown(results)
        path = run_dir / "report.md"
        path.write_text(text + "\n")
        if results.get("methods"):
            print(method_table(results["methods"]))
            print(f"selected: {results.get('selected') or 'none'}")
        written.append(path)
    if "json" in formats:
        path = run_dir / "report.json"
        path.write_text(json.dumps(results, indent=2, default=str))
        written.append(path)
    if "png" in formats:
        png = write_png(results, run_dir / "report.png")
        if png is not None:
            written.append(png)
    return written
