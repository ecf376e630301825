"""External programs a test needs (Debian packages `.ci/run` installs): found, or the test
skips with the reason; under `MEMORYWALL_CI=1` (set by `.ci/run`) a missing one fails it."""

from __future__ import annotations

import os
import shutil

import pytest

CI_ENV = "MEMORYWALL_CI"


def need(program: str, package: str) -> str:
    """The path of `program`; skip (or in CI fail) when it is not installed."""
    path = shutil.which(program)
    if path is not None:
        return path
    reason = f"{program} is not installed (apt-get install {package})"
    if os.environ.get(CI_ENV) == "1":
        pytest.fail(f"{reason}; {CI_ENV}=1 needs it")
    pytest.skip(reason)
