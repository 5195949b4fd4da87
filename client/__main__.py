"""`fedpers-client`: a device's command line (train locally, show a memory plan, join a federation)."""

from __future__ import annotations

import argparse
import logging
import sys

from . import plan_cmd, run_cmd, train_cmd


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpers-client", description="fedpers device: train on private data.")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,plan,run}")
    for mod in (train_cmd, plan_cmd, run_cmd):
        mod.add_parser(sub).set_defaults(handler=mod.main)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # the trainer has already dropped its arena and swap file
        print(f"\nfedpers-client {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
