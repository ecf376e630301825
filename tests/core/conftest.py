"""Shared fixtures for the performance-core tests: built-in profile text to edit, and a writer."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

PROFILES = resources.files("memorywall.core") / "profiles"


@pytest.fixture
def h100_text() -> str:
    """The built-in h100-sxm profile as text, to copy and edit into tmp_path."""
    return (PROFILES / "h100-sxm.toml").read_text()


@pytest.fixture
def write_profile(tmp_path: Path):
    """Write profile text to tmp_path/<name>.toml and return its path as a string."""

    def write(text: str, name: str = "custom") -> str:
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        return str(path)

    return write
