"""``accelcore data synth``: write the synthetic COCO-format dataset."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="dataset tools", description="Dataset tools.")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    s = sub.add_parser("synth", help="generate the synthetic COCO-format dataset",
                       description="Write a deterministic synthetic detection dataset "
                                   "(COCO format: train2017/, val2017/, annotations/).")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--images", type=int, default=512, help="training images (default 512)")
    s.add_argument("--val-images", type=int, default=64, help="validation images (default 64)")
    s.add_argument("--size", type=int, default=416, help="image side in pixels (default 416)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--num-classes", type=int, default=8, help="object classes (default 8)")
    s.set_defaults(handler=handle_synth)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])


def handle_synth(args: argparse.Namespace) -> int:
    from accelcore.data.synthetic import synthesize

    out = synthesize(Path(args.out), images=args.images, val_images=args.val_images,
                     size=args.size, seed=args.seed, num_classes=args.num_classes)
    print(f"accelcore: synthetic dataset written to {out}")
    return 0
