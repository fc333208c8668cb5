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

from accelcore import hookimpl
from accelcore.interfaces import Declaration

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


REFERENCE_COLUMNS = (("name", "reference", "{}"), ("status", "status", "{}"),
                     ("latency_ms", "latency ms", "{:.1f}"), ("img_per_s", "img/s", "{:.1f}"),
                     ("speedup", "speed-up", "{:.2f}x"), ("ap50_95", "AP50:95", "{:.4f}"),
                     ("ap50", "AP50", "{:.4f}"), ("precision", "precision", "{}"),
                     ("runtime", "runtime", "{}"))


def reference_table(references: list[dict]) -> str:
    """The plain-runtime reference rows as a Markdown table, their settings in the note."""
    head = "| " + " | ".join(title for _, title, _ in REFERENCE_COLUMNS) + " | settings / note |"
    lines = [head, "|" + "---|" * (len(REFERENCE_COLUMNS) + 1)]
    for row in references:
        cells = [_fmt(row.get(key), pattern) for key, _, pattern in REFERENCE_COLUMNS]
        settings = row.get("settings") or {}
        shown = ", ".join(f"{k}={v}" for k, v in settings.items()
                          if isinstance(v, (str, int, float, bool)))
        note = (row.get("reason") or shown).replace("|", "/")
        lines.append("| " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


def lead_line(lead: dict) -> str:
    if not lead or lead.get("ratio") is None:
        why = "no reference met the accuracy criterion" if lead and lead.get("selected") else (
            "no method was selected")
        return f"**Lead over the plain runtimes:** none measured ({why})"
    return (f"**Lead over the plain runtimes:** `{lead['selected']}` "
            f"{lead['selected_latency_ms']:.1f} ms vs best reference `{lead['best_reference']}` "
            f"{lead['best_reference_latency_ms']:.1f} ms = **{lead['ratio']:.2f}x**")


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
        references = results.get("references") or []
        if references:
            out += ["## Plain runtimes, same run (references)", "",
                    "What a user gets from each runtime used directly as its documentation "
                    "says; measured with the same batch, images and evaluation.", "",
                    reference_table(references), "", lead_line(results.get("lead") or {}), ""]
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
                f"- ISA flags: {flags}"]
        support = machine.get("precision_support")
        if support:
            out.append("- precisions: " + ", ".join(f"{k} {v}" for k, v in support.items()))
        setup = results.get("runtime_setup")
        if setup:
            out.append(f"- runtime setup of every method process: {setup}")
        out.append("")
    vers = results.get("versions")
    if vers:
        out += ["## Versions", ", ".join(f"{k} {v}" for k, v in vers.items()), ""]
    return "\n".join(out)


def _spread_labels(points: list[tuple[float, float]], min_gap: float,
                   width: float = 0.22) -> list[float]:
    """Label y positions that keep labels of nearby points apart: each label takes the first
    free slot among its own height, one gap up, one gap down, two up, … (several fp32 methods
    sit on the same AP). ``points`` are (x in axis-width units, y in data units)."""
    placed: list[tuple[float, float]] = []
    out = [0.0] * len(points)
    for i in sorted(range(len(points)), key=lambda k: (points[k][1], points[k][0])):
        x, y = points[i]
        for step in range(40):
            shift = (step + 1) // 2 * (1 if step % 2 else -1) * min_gap if step else 0.0
            label_y = y + shift
            if not any(abs(px - x) < width and abs(py - label_y) < min_gap for px, py in placed):
                break
        placed.append((x, label_y))
        out[i] = label_y
    return out


def write_png(results: dict, path: Path) -> Path | None:
    """Speed-up (x, log) vs AP50:95 (y): methods as dots, the selected one as a star, the
    plain-runtime references as diamonds, the accuracy budget as a band below `original`."""
    rows = [m for m in results.get("methods") or []
            if m.get("status") == "ok" and m.get("speedup") and m.get("ap50_95") is not None]
    refs = [r for r in results.get("references") or []
            if r.get("status") == "ok" and r.get("speedup") and r.get("ap50_95") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    try:
        points = [(r["speedup"], r["ap50_95"], r["method"], "method") for r in rows]
        points += [(r["speedup"], r["ap50_95"], r["name"], "reference") for r in refs]
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        base = next((r for r in rows if r["method"] == "original"), None)
        crit = results.get("accuracy_criterion") or {}
        if base is not None and crit.get("metric") == "ap50_95" and crit.get("max_drop"):
            drop = (crit["max_drop"] / 100.0 if crit.get("kind") == "absolute"
                    else base["ap50_95"] * crit["max_drop"])
            ax.axhspan(base["ap50_95"] - drop, base["ap50_95"], color="tab:green", alpha=0.12,
                       zorder=0, label=f"accuracy budget ({crit['max_drop']} "
                       f"{'AP points' if crit.get('kind') == 'absolute' else 'relative'})")
            ys += [base["ap50_95"] - drop]
        ax.set_xscale("log")
        low, high = min(xs) / 1.3, max(xs) * 2.2  # room for the labels right of the points
        ax.set_xlim(low, high)
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        span = max(ys) - min(ys) or 0.01
        # Labels are spread in data units of a gap that is a fixed share of the AP range.
        gap = 0.045 * span * 1.3
        log_x = [math.log10(x / low) / math.log10(high / low) for x in xs]
        label_y = _spread_labels([(lx, y) for lx, y in zip(log_x, ys, strict=False)], gap)
        ax.set_ylim(min([*ys, *label_y]) - 0.06 * span, max([*ys, *label_y]) + 0.12 * span)
        for (x, y, name, kind), ly in zip(points, label_y, strict=False):
            chosen = kind == "method" and name == results.get("selected")
            if kind == "reference":
                ax.scatter(x, y, s=55, marker="D", facecolors="none", edgecolors="black",
                           zorder=4)
            else:
                ax.scatter(x, y, s=140 if chosen else 30, marker="*" if chosen else "o",
                           color="tab:red" if chosen else "tab:blue", zorder=3)
            ax.annotate(name, (x, y), xytext=(x, ly), textcoords="data", fontsize=7,
                        xycoords="data", ha="left", va="bottom",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"}
                        if abs(ly - y) > 1e-9 else None)
        ax.scatter([], [], marker="D", facecolors="none", edgecolors="black",
                   label="plain runtime (reference)")
        ax.scatter([], [], marker="*", color="tab:red", s=100, label="selected")
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("speed-up vs original (median latency, log scale)")
        ax.set_ylabel("COCO AP50:95")
        size = results.get("input_size") or ["?", "?"]
        lead = (results.get("lead") or {}).get("ratio")
        lead_txt = f", lead over best reference {lead:.2f}x" if lead else ""
        cpu = (results.get("machine") or {}).get("cpu", "")
        ax.set_title(f"{cpu}\nbatch {results.get('batch_size')}, {size[0]}x{size[1]} — "
                     f"selected: {results.get('selected') or 'none'}{lead_txt}", fontsize=9)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="upper left")
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
