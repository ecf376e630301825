"""The server's import seams, read from the source: fronts reach the engine only through its
interface module, and disaggregation (`server/pd`) does not import the fronts beside it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"
ENGINE_API = "memorywall.server.engine.api"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level and TYPE_CHECKING too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            out.add(node.module)
    return out


def sources(package: str) -> list[Path]:
    files = sorted((SERVER / package).glob("*.py"))
    assert files, f"no sources under server/{package}"
    return files


@pytest.mark.parametrize("path", sources("fronts"), ids=lambda p: p.name)
def test_fronts_import_only_the_engine_interface(path):
    engine = {m for m in imported_modules(path) if m.startswith("memorywall.server.engine")}
    assert engine <= {ENGINE_API}, f"{path.name} imports {sorted(engine - {ENGINE_API})}"


@pytest.mark.parametrize("path", sources("pd"), ids=lambda p: p.name)
def test_disaggregation_imports_nothing_from_the_fronts(path):
    fronts = {m for m in imported_modules(path) if m.startswith("memorywall.server.fronts")}
    assert not fronts, f"{path.name} imports {sorted(fronts)}"
