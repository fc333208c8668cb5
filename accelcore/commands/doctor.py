"""``accelcore doctor``: what this CPU can do and what accelcore will choose on it.

Prints the CPU and its relevant ISA flags, which precisions are native, emulated or absent,
the runtime setup a run gets (allocator, OpenMP library, threads, affinity), what
``train.precision: auto`` picks, and which methods ``accelerate.methods: auto`` runs (and why
the others are skipped). ``ACCELCORE_CPU_FLAGS`` fakes the flag set ("what would it do on …").
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from accelcore.commands import add_plugin_option


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("doctor", help="CPU capabilities, runtime setup, recommended methods",
                              description=__doc__.splitlines()[0])
    p.add_argument("--recipe", help="use this recipe's runtime settings (default: built-ins)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_plugin_option(p)
    p.set_defaults(handler=handle)


def diagnose(recipe: Any, plugins: list[str]) -> dict[str, Any]:
    """Everything ``doctor`` reports, as data."""
    from accelcore.inference.auto import choose_methods
    from accelcore.machine import bf16_engine, int8_engine, machine_info
    from accelcore.plugins import get_plugin_manager
    from accelcore.runtime import RuntimeSetup, describe_runtime, transparent_huge_pages
    from accelcore.training.auto_precision import resolve_precision

    pm = get_plugin_manager([*recipe.plugins, *plugins])
    setup = RuntimeSetup.from_recipe(recipe, threads=recipe.accelerate.threads)
    setup.apply()  # report the setup a run really gets, not this bare process's
    info = machine_info()
    choice = resolve_precision("auto", True)
    methods = choose_methods(pm)
    thp = transparent_huge_pages()
    return {
        "machine": info,
        "engines": {"bf16": bf16_engine(), "int8": int8_engine()},
        "runtime_setup": {"allocator": setup.allocator, "malloc_tuning": setup.malloc_tuning,
                          "threads": setup.threads},
        # what a run gets (a single run restarts itself for it; workers start with it)
        "heap_huge_pages": {"kernel_mode": thp, "runs_get_them": (
            setup.allocator == "default" and setup.malloc_tuning
            and thp in ("always", "madvise"))},
        "runtime": describe_runtime(),
        "train_precision_auto": {"precision": choice.precision,
                                 "channels_last": choice.channels_last, "reason": choice.reason},
        "methods_auto": {"run": [c.method for c in methods if c.run],
                         "skipped": {c.method: c.reason for c in methods if not c.run}},
        "plugin_problem": pm.setup_problem(),
    }


def handle(args: argparse.Namespace) -> int:
    from accelcore.config import load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else load_recipe(data={})
    report = diagnose(recipe, args.plugins)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    m, rt = report["machine"], report["runtime"]
    faked = "  (flags faked by ACCELCORE_CPU_FLAGS)" if m.get("flags_faked") else ""
    print(f"CPU        {m['cpu']}, {m['usable_cores']} usable core(s){faked}")
    have = [f for f, on in m["flags"].items() if on]
    lack = [f for f, on in m["flags"].items() if not on]
    print(f"ISA        has: {' '.join(have) or '-'}")
    print(f"           lacks: {' '.join(lack) or '-'}")
    print("precision  " + ", ".join(f"{p} {s}" for p, s in m["precision_support"].items())
          + f"  (bf16 unit: {report['engines']['bf16']}; int8 unit: {report['engines']['int8']})")
    affinity = ",".join(map(str, rt["affinity"])) or "?"
    print(f"runtime    allocator {rt['allocator']}, OpenMP {rt['openmp']}, {rt['threads']} "
          f"thread(s), cores {affinity}")
    huge = report["heap_huge_pages"]
    print(f"           heap on huge pages in runs: {'yes' if huge['runs_get_them'] else 'no'} "
          f"(kernel THP mode: {huge['kernel_mode']})")
    if rt["env"]:
        print("           " + " ".join(f"{k}={v}" for k, v in rt["env"].items()))
    tp = report["train_precision_auto"]
    print(f"training   train.precision auto -> {tp['precision']} + channels_last "
          f"({tp['reason']})")
    ma = report["methods_auto"]
    print(f"inference  accelerate.methods auto -> {', '.join(ma['run']) or 'none'}")
    for method, reason in ma["skipped"].items():
        print(f"           skipped {method}: {reason}")
    if report["plugin_problem"]:
        print(f"plugins    {report['plugin_problem']}")
    return 0
