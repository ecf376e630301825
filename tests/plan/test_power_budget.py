"""`--power-budget` parsing (issue 29): a power with its unit, in watts; bad values one line."""

from __future__ import annotations

import argparse
import re

import pytest

from memorywall.argtypes import power_watts
from memorywall.cli.usage import Parser, UsageError


@pytest.mark.parametrize(
    ("text", "watts"),
    [
        ("250MW", 250e6),
        ("250 MW", 250e6),
        (" 1.5GW ", 1.5e9),
        ("800kW", 800e3),
        ("800KW", 800e3),
        ("700W", 700.0),
        ("2.5e2MW", 250e6),
    ],
)
def test_power_with_unit(text, watts):
    assert power_watts(text) == pytest.approx(watts, rel=0, abs=1e-6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("250", "expected a power with its unit"),  # a bare number: no guessing the unit
        ("", "expected a power with its unit"),
        ("MW", "expected a power with its unit"),
        ("250mW", "unknown power unit 'mW' (valid: W, kW, MW, GW)"),
        ("250TW", "unknown power unit 'TW'"),
        ("25..0MW", "expected a number before 'MW'"),
        ("0MW", "must be a finite power > 0"),
        ("-5MW", "must be a finite power > 0"),
        ("infMW", "expected a power with its unit"),  # letters before the unit: no number
        ("1e999MW", "must be a finite power > 0"),
    ],
)
def test_bad_power_is_a_one_line_error(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        power_watts(text)
    parser = Parser(prog="memorywall plan")
    parser.add_argument("--power-budget", type=power_watts)
    with pytest.raises(UsageError) as e:  # main prints it as one line, exit 2
        parser.parse_args(["--power-budget", text])
    assert "--power-budget" in str(e.value) and "\n" not in str(e.value)
