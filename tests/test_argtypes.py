"""The argparse type functions: accepted values, and refusals that name the rule."""

from __future__ import annotations

import argparse

import pytest
from fedpers.argtypes import fraction, host_port, nonnegative_int, positive_float, positive_int, share


@pytest.mark.parametrize(("parse", "good", "bad"), [
    (positive_int, {"1": 1, "32": 32}, ["0", "-3", "1.5", "x"]),
    (nonnegative_int, {"0": 0, "7": 7}, ["-1", "two"]),
    (positive_float, {"0.5": 0.5, "3": 3.0}, ["0", "-1", "inf", "nan", "x"]),
    (fraction, {"1": 1.0, "0.05": 0.05}, ["0", "1.01", "-0.5", "half"]),
    (share, {"0.2": 0.2, "0.999": 0.999}, ["0", "1", "1.5", "some"]),
    (host_port, {"127.0.0.1:50051": "127.0.0.1:50051", "[::1]:0": "[::1]:0"}, ["nohostport", ":80", "h:", "h:x",
                                                                                "h:70000"]),
])
def test_type_functions(parse, good, bad) -> None:
    for text, value in good.items():
        assert parse(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError) as refused:
            parse(text)
        assert text in str(refused.value)


def test_refusal_names_the_rule() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="must be a positive integer, got 0"):
        positive_int("0")
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number in \\(0, 1\\], got 'half'"):
        fraction("half")
