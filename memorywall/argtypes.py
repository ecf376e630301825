"""argparse `type=` parsers for numbers with a range, shared by every subcommand."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import TypeVar

N = TypeVar("N", int, float)


def number(
    kind: type[N], *, low: float, high: float | None = None, low_inclusive: bool = True
) -> Callable[[str], N]:
    """A parser for one finite `kind` in [low, high] (or (low, high] when not inclusive)."""
    noun = "an integer" if kind is int else "a number"
    if high is None:
        bound = f">= {low:g}" if low_inclusive else f"> {low:g}"
    else:
        bound = f"in [{low:g}, {high:g}]" if low_inclusive else f"in ({low:g}, {high:g}]"

    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        too_low = value < low or (value == low and not low_inclusive)
        if too_low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value:g}")
        return value

    return parse


def number_list(
    kind: type, *, low: float, low_inclusive: bool = True
) -> Callable[[str], tuple[int | float, ...]]:
    """A parser for comma-separated values, each as `number` checks it: "1,4,16"."""
    one = number(kind, low=low, low_inclusive=low_inclusive)

    def parse(text: str) -> tuple[int | float, ...]:
        try:
            return tuple(one(item) for item in text.split(","))
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: every value {e}") from None

    return parse


positive_int = number(int, low=1)
nonnegative_int = number(int, low=0)
positive_float = number(float, low=0, low_inclusive=False)
fraction = number(float, low=0, high=1)
port = number(int, low=0, high=65535)


def stream_interval(text: str) -> int | None:
    """`--stream-interval`: tokens per streamed message (an integer >= 1), or `auto` (None)."""
    if text == "auto":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'auto', got {text!r}"
        ) from None


_POWER_UNITS = {"W": 1.0, "kW": 1e3, "KW": 1e3, "MW": 1e6, "GW": 1e9}
_POWER = re.compile(r"\s*([0-9.eE+-]+)\s*([A-Za-z]*)\s*")


def power_watts(text: str) -> float:
    """`--power-budget`: a power with its unit, `250MW`, `1.5 GW`, `800kW`, `700W`, in watts.

    A bare number is refused: a budget off by 1e6 for a missing unit is the likeliest mistake.
    """
    match = _POWER.fullmatch(text)
    if match is None or not match.group(2):
        raise argparse.ArgumentTypeError(
            f"expected a power with its unit (W, kW, MW, GW), e.g. 250MW, got {text!r}"
        )
    digits, unit = match.groups()
    if unit not in _POWER_UNITS:
        valid = ", ".join(dict.fromkeys(u for u in _POWER_UNITS if u != "KW"))
        raise argparse.ArgumentTypeError(f"unknown power unit {unit!r} (valid: {valid})")
    try:
        value = float(digits)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number before {unit!r}, got {text!r}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite power > 0, got {text!r}")
    return value * _POWER_UNITS[unit]


def otlp_endpoint(text: str) -> str:
    """An OTLP/HTTP collector URL: http(s)://host[:port][/path]. A URL without a path gets
    the standard `/v1/traces` (as OTEL_EXPORTER_OTLP_ENDPOINT does); one with a path is
    used as given (as OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is)."""
    from urllib.parse import urlsplit

    try:
        url = urlsplit(text)
        url.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a URL: {text!r} ({e})") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise argparse.ArgumentTypeError(
            f"expected an http(s)://host:port OTLP/HTTP URL, got {text!r}"
        )
    if url.path in ("", "/"):
        return text.rstrip("/") + "/v1/traces"
    return text
