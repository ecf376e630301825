"""No module of the package reaches into another module's private names.

A name with a leading underscore belongs to the module (or package) that defines it:
`memorywall.core.cost._draft_work` to `memorywall.core.cost`, the private module
`memorywall.client._base` to the package `memorywall.client`, whose own modules may use it.
Anything else that imports it (`from x import _y`, `import x._y`) or reads it off an
imported module (`x._y`) depends on what its owner is free to change; it should use a
public name, or the owner should make one. Scans the package's source (as pyproject.toml
maps it), not tests/ or benchmarks/.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Reach:
    path: str  # relative to the repository
    line: int
    importer: str
    name: str  # the dotted name reached

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} uses {self.name}"


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name, laid out as pyproject.toml maps it."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = setuptools["package-dir"]
    modules: dict[str, Path] = {}
    for package, folder in mapping.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            # A folder mapped on its own (memorywall.core) wins over the parent's copy of it.
            modules.setdefault(name, path)
    return modules


def owner(dotted: str) -> str | None:
    """The module that owns `dotted`'s first private part, or None if it has none."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not (part.startswith("__") and part.endswith("__")):
            return ".".join(parts[:i])
    return None


def allowed(importer: str, dotted: str) -> bool:
    """Private names are for their owner and, when it is a package, its own modules."""
    own = owner(dotted)
    return own is None or importer == own or importer.startswith(own + ".")


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    package = importer if is_package else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def reaches(importer: str, path: Path, modules: dict[str, Path], root: Path = ROOT) -> list[Reach]:
    """Every private name of another module that `importer` (at `path`) imports or reads."""
    tree = ast.parse(path.read_text(), str(path))
    rel = str(path.relative_to(root))
    found: list[Reach] = []
    bound: dict[str, str] = {}  # local name -> the project module it is bound to

    def check(dotted: str, line: int) -> None:
        if not allowed(importer, dotted):
            found.append(Reach(rel, line, importer, dotted))

    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(node, importer, is_package)
            if source.split(".")[0] != "memorywall":
                continue
            for alias in node.names:
                dotted = f"{source}.{alias.name}"
                check(dotted, node.lineno)
                if dotted in modules:
                    bound[alias.asname or alias.name] = dotted
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "memorywall":
                    continue
                check(alias.name, node.lineno)
                if alias.asname:
                    bound[alias.asname] = alias.name
                # `import a.b.c` binds `a`, whose attributes reach a.b.c by their full names.
                bound.setdefault(alias.name.split(".")[0], alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = [node.attr]
            base: ast.expr = node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                dotted = ".".join([bound[base.id], *reversed(chain)])
                # Only the part that names modules and one attribute of the last module.
                check(_module_part(dotted, modules), node.lineno)
    return sorted(set(found), key=lambda r: (r.path, r.line, r.name))


def _module_part(dotted: str, modules: dict[str, Path]) -> str:
    """`dotted` up to the first name after its longest module prefix: `a.b.mod.attr`."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[: i + 1])
    return dotted


def all_reaches() -> list[Reach]:
    modules = package_modules()
    out: list[Reach] = []
    for name, path in sorted(modules.items()):
        out.extend(reaches(name, path, modules))
    return out


def test_no_module_uses_another_modules_private_names():
    found = all_reaches()
    assert not found, "private names used outside their module:\n" + "\n".join(map(str, found))


# --- the scan itself --------------------------------------------------------------------------


def _scan(tmp_path: Path, importer: str, source: str, *, package: bool = False) -> list[str]:
    path = tmp_path / ("__init__.py" if package else "m.py")
    path.write_text(source)
    modules = {"memorywall.core.cost": path, "memorywall.client": path, importer: path}
    return [r.name for r in reaches(importer, path, modules, root=tmp_path)]


def test_the_scan_finds_each_way_of_reaching_a_private_name(tmp_path):
    source = """
from memorywall.core.cost import _draft_work, StepModel
from memorywall.client._base import translate
import memorywall.core.cost as cost
import memorywall.core.cost
from memorywall.core import cost as c2
x = cost._split(1) + c2._GEMM_MEMO + memorywall.core.cost._tp
y = cost.StepModel.__init__
"""
    assert _scan(tmp_path, "memorywall.loadgen.bench", source) == [
        "memorywall.core.cost._draft_work",  # line 2
        "memorywall.client._base.translate",  # line 3: a private module
        "memorywall.core.cost._GEMM_MEMO",  # line 7, by name
        "memorywall.core.cost._split",
        "memorywall.core.cost._tp",
    ]


def test_a_package_may_use_its_own_private_modules(tmp_path):
    source = (
        "from memorywall.client import _convert\nfrom . import _base\nfrom ._sync import Client\n"
    )
    assert _scan(tmp_path, "memorywall.client._async", source) == []
    assert _scan(tmp_path, "memorywall.client", source, package=True) == []
    assert _scan(
        tmp_path, "memorywall.loadgen.target", "from memorywall.client import _convert"
    ) == ["memorywall.client._convert"]
