"""The `memorywall` command line loads one command's module for that command alone, and
parses its arguments as the whole parser does."""

from __future__ import annotations

import subprocess
import sys

import pytest

from memorywall.cli.app import COMMANDS, build_parser


def _choices(parser) -> list[str]:
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return list(sub.choices)


def test_every_command_is_listed_with_its_module_in_help_order() -> None:
    assert _choices(build_parser()) == list(COMMANDS)
    for command in COMMANDS:
        assert _choices(build_parser(command)) == [
            c for c in COMMANDS if COMMANDS[c] == COMMANDS[command]
        ]


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--hardware", "wse-3", "--model", "llama-3.1-8b", "--token-times", "none"],
        ["predict", "--hardware", "h100-sxm", "--model", "llama-3.1-8b"],
        ["models"],
    ],
)
def test_one_commands_parser_parses_as_the_whole_one(argv: list[str]) -> None:
    one, whole = build_parser(argv[0]).parse_args(argv), build_parser().parse_args(argv)
    assert vars(one) == vars(whole)


def test_help_still_lists_every_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "memorywall", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert all(command in out for command in COMMANDS)
