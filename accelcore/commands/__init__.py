"""Sub-commands of the ``accelcore`` CLI, one module each with ``register(subparsers)``."""

from __future__ import annotations

import argparse


def add_plugin_option(parser: argparse.ArgumentParser) -> None:
    """``--plugin MODULE`` (load an unpackaged plugin) / ``--plugin no:NAME`` (switch one off)."""
    parser.add_argument(
        "--plugin", dest="plugins", action="append", default=[], metavar="MODULE|no:NAME",
        help="load an unpackaged plugin module (import path), or switch an installed plugin "
             "off with no:NAME (as pytest's -p no:NAME); repeatable")
