"""`fedpers-client`: a device's command line (train locally, show a memory plan, join a federation,
export a model, predict and evaluate with one)."""

from __future__ import annotations

import argparse
import sys

from fedpers.logs import add_logging_args, setup_logging

from . import evaluate_cmd, export_cmd, plan_cmd, predict_cmd, run_cmd, train_cmd

# `run` reports its progress at INFO; the local commands print their own output and log warnings only.
DEFAULT_LOG_LEVEL = {"run": "INFO"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpers-client", description="fedpers device: train on private data.")
    level_help = "DEBUG, INFO, WARNING or ERROR (default: INFO for run, WARNING otherwise)"
    add_logging_args(p, level_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,plan,run,export,predict,evaluate}")
    for mod in (train_cmd, plan_cmd, run_cmd, export_cmd, predict_cmd, evaluate_cmd):
        cmd = mod.add_parser(sub)
        cmd.set_defaults(handler=mod.main)
        add_logging_args(cmd, level_help, on_subcommand=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup_logging(args.log_level or DEFAULT_LOG_LEVEL.get(args.command, "WARNING"), args.log_file,
                      args.log_format)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # the trainer has already dropped its arena and swap file
        print(f"\nfedpers-client {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
