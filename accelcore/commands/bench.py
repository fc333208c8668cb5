"""``accelcore bench train RECIPE``: training throughput of several configurations side by side.

``bench`` is a command group; ``bench infer`` can be added later as another sub-command.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from accelcore.commands import add_plugin_option
from accelcore.errors import RecipeError


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks (bench train …)",
                              description="Throughput benchmarks run in one process.")
    sub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])

    from accelcore.training.bench import CONFIGS, DEFAULT_CONFIGS, MODES

    t = sub.add_parser(
        "train", help="training img/s per configuration (fp32, bf16, channels_last, compile, …)",
        description="Times N training iterations (after warm-up) per configuration and prints "
                    "median img/s and the ratio to `stock` (plain PyTorch: fp32 eager, no "
                    "allocator tuning, default threads), each configuration in its own process. "
                    "Modes: compute (fixed preloaded batch) and e2e (real loader with mosaic and "
                    "multiscale), measured in alternating blocks of steps with the loader's "
                    "workers stopped during compute. `auto` is train.precision: auto. "
                    f"Configs: {', '.join(CONFIGS)}.")
    t.add_argument("recipe", help="recipe YAML file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (e.g. --set train.batch_size=16)")
    t.add_argument("--iters", type=int, default=10, help="timed iterations per config (10)")
    t.add_argument("--warmup", type=int, default=3, help="untimed warm-up iterations (3)")
    t.add_argument("--rounds", type=int, default=1,
                   help="measure the configurations this many times, interleaved, and pool "
                        "each one's steps (steadier ratios on a machine whose speed drifts)")
    t.add_argument("--baseline", metavar="CONFIG", default=None,
                   help="the measured config every ratio is taken against (default stock, or "
                        "fp32 when stock is not measured; e.g. fp32_cl_torch for the lean step)")
    t.add_argument("--configs", type=_csv, default=list(DEFAULT_CONFIGS),
                   help=f"comma-separated (default {','.join(DEFAULT_CONFIGS)})")
    t.add_argument("--modes", type=_csv, default=list(MODES), help="compute,e2e (default both)")
    t.add_argument("--json", dest="json_path", metavar="FILE", help="write the rows as JSON")
    t.add_argument("--in-process", action="store_true",
                   help="measure every configuration in this process (quicker, less clean)")
    t.add_argument("--profile", action="store_true",
                   help="also print where the step time goes (first config, eager, e2e)")
    add_plugin_option(t)
    t.add_argument("--num-processes", type=lambda s: [int(x) for x in _csv(s)], default=None,
                   metavar="N,N", help="instead of --configs: the recipe's config on N DDP "
                   "processes with disjoint cores (e.g. 1,2 = 1x2 vs 2x1 threads on 2 cores)")
    t.add_argument("--strategies", type=_csv, default=None,
                   help="with --num-processes: comma-separated strategies (default: every "
                   "declared strategy but single; see accelcore list-plugins)")
    t.set_defaults(handler=handle_train)


def handle_train(args: argparse.Namespace) -> int:
    from accelcore.config import load_recipe
    from accelcore.runtime import RuntimeSetup, require_process_setup
    from accelcore.training.bench import bench_train, profile_train

    recipe = load_recipe(args.recipe, [*args.overrides, "train.quiet=true"])
    recipe.plugins = [*recipe.plugins, *args.plugins]
    if not args.configs:
        raise RecipeError("--configs: give at least one configuration")
    cfg = recipe.train
    if not args.num_processes:  # before anything is printed: it may restart the command
        # Children get the setup's environment; this process runs --in-process and --profile.
        require_process_setup(RuntimeSetup.from_recipe(recipe), getattr(args, "command_line", None))
    print(f"bench train: {recipe.model.name or 'default model'}, batch {cfg.batch_size}, input "
          f"{recipe.model.input_size or 'model default'}, threads {cfg.threads or 'default'}, "
          f"{args.iters} timed + {args.warmup} warm-up iterations")
    if args.num_processes:
        return _handle_processes(args, recipe)
    rows = bench_train(recipe, args.configs, args.modes, args.iters, args.warmup,
                       isolate=not args.in_process, rounds=args.rounds, baseline=args.baseline)
    baseline = rows[0]["baseline"] if rows else "stock"
    _print_rows(f"{'config':<16} {'mode':<8}", f"vs {baseline}", rows,
                lambda r: f"{r['config']:<16} {r['mode']:<8}", "unavailable")
    if args.profile:
        first = next((c for c in args.configs if "compile" not in c and "+" not in c), "fp32")
        prof = profile_train(recipe, first, args.iters, args.warmup)
        step = prof["step"]
        print(f"\nprofile ({first}, e2e, batch {int(prof['batch'])}): median step "
              f"{1000 * step:.0f} ms")
        for phase in ("data", "forward", "loss", "backward", "optimizer", "ema"):
            print(f"  {phase:<10} {1000 * prof[phase]:8.1f} ms  {100 * prof[phase] / step:5.1f}%")
    if args.json_path:
        keys = ("config", "mode", "img_per_s", "speedup", "step_ms", "status", "reason",
                "precision", "lean_step", "runtime", "baseline", "round_img_per_s",
                "round_speedup")
        out = [{k: r.get(k) for k in keys} for r in rows]
        Path(args.json_path).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json_path}")
    return 0


def _handle_processes(args: argparse.Namespace, recipe: object) -> int:
    """Rows per strategy x process count, each strategy run through ``accelcore_launch``."""
    from accelcore.plugins import get_plugin_manager
    from accelcore.training.distributed_bench import bench_distributed

    rows = bench_distributed(get_plugin_manager(recipe.plugins), recipe, args.strategies,
                             args.num_processes, args.iters, args.warmup)
    def label(r: dict) -> str:
        layout = f"{r['processes']} x {r['threads'] or '?'}"
        return f"{r['strategy']:<11} {layout:<16}"

    _print_rows(f"{'strategy':<11} {'procs x threads':<16}", "vs 1 proc", rows, label, "failed")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(rows, indent=2))
        print(f"wrote {args.json_path}")
    return 0


def _print_rows(label_header: str, ratio_header: str, rows: list[dict],
                label: Callable[[dict], str], failed_word: str) -> None:
    """The img/s table: one line per row, ``-`` and the reason for rows that did not run."""
    width = len(ratio_header)
    print(f"\n{label_header} {'img/s':>8} {ratio_header:>{width}}")
    for r in rows:
        if r["status"] != "ok":
            print(f"{label(r)} {'-':>8} {'-':>{width}}  {failed_word}: {r['reason']}")
            continue
        ratio = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        per_round = ""
        if r.get("round_img_per_s"):
            text = f"rounds: {' / '.join(f'{v:.2f}' for v in r['round_img_per_s'])}"
            if r.get("round_speedup") and r["config"] != r.get("baseline"):
                text += f"; ratio by round: {' / '.join(f'{v:.2f}x' for v in r['round_speedup'])}"
            per_round = f"  ({text})"
        print(f"{label(r)} {r['img_per_s']:8.2f} {ratio:>{width}}{per_round}")
