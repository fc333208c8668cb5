"""``accelcore run RECIPE``: run a recipe's stages into one run folder."""

from __future__ import annotations

import argparse

from accelcore.commands import add_plugin_option
from accelcore.config import load_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run a recipe (train / accelerate / validate / report)",
                              description="Run the stages listed in a recipe's `stages:` key.")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key; the value is parsed as YAML "
                        "(e.g. --set train.batch_size=16 --set stages=[validate])")
    p.add_argument("--out", help="run folder (default: runs/<recipe>-<timestamp>/)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue training from RUN_DIR/checkpoints/last.pth")
    add_plugin_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars (same as "
                   "--set train.quiet=true)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from accelcore.pipeline import run_recipe
    from accelcore.runtime import RuntimeSetup, require_process_setup

    overrides = list(args.overrides)
    if args.quiet:
        overrides.append("train.quiet=true")
    recipe = load_recipe(args.recipe, overrides)
    recipe.plugins = [*recipe.plugins, *args.plugins]
    if args.resume is not None and args.out is not None:
        from accelcore.errors import RecipeError

        raise RecipeError("--resume continues in the given run folder; do not combine with --out")
    if "train" in recipe.stages and recipe.train.strategy == "single":
        # Multi-process strategies start their workers under the setup themselves.
        require_process_setup(RuntimeSetup.from_recipe(recipe), getattr(args, "command_line", None))
    results = run_recipe(recipe, out=args.out, resume=args.resume)
    print(f"accelcore: done in {results['wall_s']:.1f} s -> {results['run_dir']}")
    return 0
