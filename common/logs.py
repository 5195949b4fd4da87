"""Logging set-up for every command: level, optional file, and text or JSON lines.

JSON lines (`--log-format json`) carry time, level, logger, message and, for an exception, its
traceback, one object per line, for log shippers; text is for people.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str | int = "INFO", file: str | Path | None = None, fmt: str = "text") -> None:
    """Configure the root logger once per process: stderr, or append to `file`, as text or JSON lines."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    if isinstance(level, str):
        name = level.upper()
        if name not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = logging.getLevelNamesMapping()[name]
    if file is not None:
        Path(file).parent.mkdir(parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)


def add_logging_args(p: argparse.ArgumentParser, level_help: str, on_subcommand: bool = False) -> None:
    """--log-level, --log-file, --log-format. On a subcommand they default to 'not given', so the same
    flags work before and after the subcommand's name."""
    given = {"default": argparse.SUPPRESS} if on_subcommand else {}
    p.add_argument("--log-level", help=level_help, **({"default": None} | given))
    p.add_argument("--log-file", metavar="FILE", help="append log lines to FILE instead of stderr",
                   **({"default": None} | given))
    p.add_argument("--log-format", choices=LOG_FORMATS,
                   help="text (default) or json: one JSON object per line, for log shippers",
                   **({"default": "text"} | given))
