"""The value types of flags: argparse `type=` functions that turn a flag's text into a value
or raise ArgumentTypeError with one line. Ground floor: the run schema (gsd.config) declares
each setting with one of these, and every command uses the same ones."""

from __future__ import annotations

import argparse
from typing import Callable

from gsd.util import MAX_SEED

__all__ = ["positive_int", "nonnegative_int", "positive_float", "nonnegative_float", "bounded_int", "seed_int",
           "count_int", "MAX_COUNT", "bounded_float", "irl_scale", "unit_interval_float"]


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")


def _parse_float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")


def positive_int(text: str) -> int:
    value = _parse_int(text, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _parse_int(text, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _parse_float(text, "a positive number")
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _parse_float(text, "a non-negative number")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite non-negative number, got {text}")
    return value


def bounded_int(lo: int, hi: int, why: str = "") -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi]; `why` (e.g. "the largest seed torch accepts")
    is added to the message when the value is out of range."""
    what = f"an integer in [{lo}, {hi}]"

    def parse(text: str) -> int:
        value = _parse_int(text, what)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected {what}{f' ({why})' if why else ''}, got {value}")
        return value

    parse.__name__ = "bounded_int"  # argparse names the type in some messages
    return parse


def seed_int(text: str) -> int:
    """argparse type for --seed: 0 <= seed <= MAX_SEED (what torch and scikit-learn accept)."""
    return bounded_int(0, MAX_SEED, "the seed range every random generator used accepts")(text)


# Counts (iterations, batch sizes, sample counts) above this are never meant: they overflow
# int64 arithmetic downstream (schedules, seeds, tensor sizes) long before they finish.
MAX_COUNT = 10 ** 12


def count_int(text: str) -> int:
    """argparse type: a positive integer up to MAX_COUNT."""
    return bounded_int(1, MAX_COUNT, "larger counts cannot be meant")(text)


def bounded_float(lo: float, hi: float, why: str = "", *, lo_open: bool = True) -> Callable[[str], float]:
    """argparse type: a finite number in (lo, hi] ([lo, hi] with lo_open=False); `why` explains hi."""
    what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def parse(text: str) -> float:
        value = _parse_float(text, what)
        if not ((value > lo if lo_open else value >= lo) and value <= hi):  # NaN fails both
            raise argparse.ArgumentTypeError(f"expected {what}{f' ({why})' if why else ''}, got {text}")
        return value

    parse.__name__ = "bounded_float"
    return parse


def irl_scale(text: str):
    """`optimal` or a positive float (docs/definitions.md §2.1)."""
    if text == "optimal":
        return "optimal"
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'optimal' or a positive number, got {text!r}")


def unit_interval_float(text: str) -> float:
    value = _parse_float(text, "a number in [0, 1]")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value
