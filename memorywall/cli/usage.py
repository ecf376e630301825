"""The CLI's one error shape: every mistake a user can make is one line and exit code 2."""

from __future__ import annotations

import argparse

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad option or combination of options; `main` prints it as one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but every error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)
