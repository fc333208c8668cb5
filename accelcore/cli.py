"""The ``accelcore`` command line. Each sub-command lives in ``accelcore/commands/<name>.py``
and exposes ``register(subparsers)``; the handler it sets returns an exit code."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from accelcore import __version__
from accelcore.errors import AccelcoreError

COMMANDS = ("run", "list_plugins", "doctor", "data", "bench", "optimize", "predict")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accelcore",
        description="Fast CPU training and inference of object detectors (YOLOX).")
    parser.add_argument("--version", action="version", version=f"accelcore {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"accelcore.commands.{name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The arguments to restart with (allocator preloading); None when called from Python.
    args.command_line = sys.argv[1:] if argv is None else None
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except AccelcoreError as exc:
        print(f"accelcore: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("accelcore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
