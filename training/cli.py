"""scxnn-train: command line of the training package."""

from __future__ import annotations

import argparse
import logging
import sys

from scxnn_node.model.bundle import BundleError
from training.demo import DemoSettings, build_demo_bundle


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scxnn-train", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo-bundle", help="train the small demo bundle on synthetic images")
    demo.add_argument("--out", required=True, help="bundle directory to create")
    demo.add_argument("--size", type=int, default=DemoSettings.size)
    demo.add_argument("--train-count", type=int, default=DemoSettings.train_count)
    demo.add_argument("--val-count", type=int, default=DemoSettings.val_count)
    demo.add_argument("--epochs", type=int, default=DemoSettings.epochs)
    demo.add_argument("--seed", type=int, default=DemoSettings.seed)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    if args.command == "demo-bundle":
        settings = DemoSettings(
            size=args.size,
            train_count=args.train_count,
            val_count=args.val_count,
            epochs=args.epochs,
            seed=args.seed,
        )
        try:
            manifest = build_demo_bundle(args.out, settings)
        except BundleError as exc:
            print(f"scxnn-train: {exc}", file=sys.stderr)
            return 1
        vp = manifest.operating_point.validation
        print(
            f"demo bundle {manifest.name} {manifest.version} written to {args.out}: "
            f"validation sensitivity {vp['sensitivity']:.3f}, specificity {vp['specificity']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
