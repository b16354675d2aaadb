"""Command-line values checked against the same bounds as the spec, with messages users read.

argparse names the type function in its message when a converter raises ValueError
(``invalid _positive_int value``); these converters raise ArgumentTypeError with the
bounds instead, and ``ArgumentParser`` prints the problem as one ``error:`` line, exit 2,
as every other mistake a user can make.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import NoReturn

_WHOLE = re.compile(r"[-+]?[0-9]{1,30}")  # ASCII digits only; int() would also take '١٢' and '1_0'
_DECIMAL = re.compile(r"[-+]?(?:[0-9]{1,30}(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]{1,4})?")
SHOWN_CHARS = 40


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one ``error: ...`` line and exit 2, not usage text."""

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> object:
        # Python 3.11's argparse drops a "--" even from "--flag=--", leaving a one-value flag
        # the value [] instead of its type's error; the text "--" is the flag's value here.
        if action.nargs is None and arg_strings == ["--"]:
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


def _shown(text: str) -> str:
    return repr(text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "...")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _bounds(low: float | None, high: float | None, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"{'above' if low_open else 'from'} {_num(low)} to {_num(high)}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_num(low)}"
    return "" if high is None else f"<= {_num(high)}"


def whole_number(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """A converter for an integer flag within [low, high] (either end may be open-ended: None)."""
    expected = f"expected a whole number {_bounds(low, high)}".rstrip()

    def whole_number(text: str) -> int:
        if not _WHOLE.fullmatch(text.strip()):
            raise argparse.ArgumentTypeError(f"{expected}, got {_shown(text)}")
        value = int(text)
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{expected}, got {value}")
        return value

    return whole_number


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    """A converter for a finite decimal flag within [low, high], or (low, high] with ``low_open``."""
    expected = f"expected a number {_bounds(low, high, low_open)}".rstrip()

    def number(text: str) -> float:
        value = float(text) if _DECIMAL.fullmatch(text.strip()) else math.nan
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{expected}, got {_shown(text)}")
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{expected}, got {text.strip()}")
        return value

    return number
