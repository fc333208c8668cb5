"""``accelcore list-plugins``: what every loaded plugin provides and whether it runs here."""

from __future__ import annotations

import argparse
import json

from accelcore.commands import add_plugin_option
from accelcore.interfaces import KINDS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("list-plugins", help="list plugins, what they provide, availability",
                              description="List every plugin (built-in and third-party, loaded "
                                          "through the `accelcore` entry-point group).")
    p.add_argument("--kind", choices=KINDS, help="only this kind")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_plugin_option(p)
    p.set_defaults(handler=handle)


def rows(kind: str | None = None, extra: list[str] | None = None) -> list[dict]:
    from accelcore.plugins import get_plugin_manager

    pm = get_plugin_manager(extra or [])
    out = []
    for provided in pm.declarations():
        d, rec = provided.declaration, provided.plugin
        if kind and d.kind != kind:
            continue
        out.append({"plugin": rec.name, "kind": d.kind, "provides": d.name,
                    "available": d.available, "reason": d.reason, "summary": d.summary,
                    "version": rec.version, "distribution": rec.distribution})
    for rec in pm.records.values():
        if kind is None and (rec.error or rec.disabled):
            why = f"switched off (no:{rec.name})" if rec.disabled else (
                f"failed to load: {rec.error}")
            out.append({"plugin": rec.name, "kind": "?", "provides": rec.module,
                        "available": False, "reason": why, "summary": "",
                        "version": rec.version, "distribution": rec.distribution})
    order = (*KINDS, "?")
    out.sort(key=lambda r: (order.index(r["kind"]) if r["kind"] in order else 99,
                            r["plugin"], r["provides"]))
    return out


def handle(args: argparse.Namespace) -> int:
    from accelcore.plugins import get_plugin_manager

    table = rows(args.kind, args.plugins)
    problem = get_plugin_manager().setup_problem()
    if problem:
        print(f"accelcore: {problem}")
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    headers = ["plugin", "kind", "provides", "available", "version", "distribution",
               "what it does / why not"]
    lines = []
    for r in table:
        note = r["summary"] if r["available"] else f"{r['reason']}"
        lines.append([r["plugin"], r["kind"], r["provides"], "yes" if r["available"] else "no",
                      r["version"], r["distribution"], note])
    widths = [max(len(h), *(len(str(line[i])) for line in lines)) if lines else len(h)
              for i, h in enumerate(headers)]
    widths[-1] = len(headers[-1])  # the last column is free text
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)))
    return 0
