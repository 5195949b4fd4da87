"""argparse `type=` functions shared by the command lines: a bad value is refused by argparse itself
(exit 2, the flag named, no traceback)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(convert: Callable[[str], float], ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    """A type= function: `convert` the text, then require `ok(value)`; `what` names the rule."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__doc__ = what
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: 0 < v and math.isfinite(v), "a finite number > 0")
fraction = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
share = _number(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")


def host_port(text: str) -> str:
    """HOST:PORT with a numeric port (an IPv6 host in brackets: [::1]:50051)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:50051), got {text!r}")
    return text
