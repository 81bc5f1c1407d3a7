"""Checked values of the `girandole serve` flags and their GIRANDOLE_* variables.

A variable's value is the flag's default as a string, so argparse converts it with the flag's
`type` as it does a command-line value: a bad one ends start-up with a usage error (exit 2)
naming the flag and the variable, instead of a traceback when the parser is built.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from girandole.env_switches import switch_word

ENV_PREFIX = "GIRANDOLE_"


def env_default(name: str, default: str | None = None) -> str | None:
    """GIRANDOLE_<name>, or `default` where it is unset or blank."""
    value = os.environ.get(ENV_PREFIX + name, "")
    return value if value.strip() else default


def int_value(env: str, low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer from `low` (to `high`), else an error naming `env`."""
    bounds = f"from {low} to {high}" if high is not None else f">= {low}"

    def convert(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an integer {bounds} [{ENV_PREFIX}{env}]"
            )
        return value

    return convert


def float_value(env: str | None, low: float, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number >= `low` (> `low` with `above`), else an error naming
    `env` (None: a flag without a variable)."""
    bounds = f"> {low:g}" if above else f">= {low:g}"
    named = f" [{ENV_PREFIX}{env}]" if env else ""

    def convert(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number {bounds}{named}")
        return value

    return convert


def folder_value(env: str) -> Callable[[str], str]:
    """An argparse type: a folder that is there or can be made (no file in its place or above
    it), else an error naming `env`."""

    def convert(text: str) -> str:
        path = Path(text).expanduser()
        while not path.exists() and path != path.parent:
            path = path.parent
        if not path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a folder ({str(path)!r} is a file) [{ENV_PREFIX}{env}]"
            )
        return text

    return convert


def url_value(env: str) -> Callable[[str], str]:
    """An argparse type: an http:// or https:// URL with a host, else an error naming `env`."""

    def convert(text: str) -> str:
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an http:// or https:// URL [{ENV_PREFIX}{env}]"
            )
        return text

    return convert


def switch_value(value: bool | str | None, env: str) -> bool:
    """A store_true flag whose default is its variable's text: True from the command line, the
    variable read as a yes/no word, False without either (ValueError naming `env`)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    return switch_word(value, env)
