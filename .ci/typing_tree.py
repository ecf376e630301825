"""Lay the package out as it imports, for tools that do not follow the editable install.

pyproject.toml maps `memorywall.core` to `core/`, `memorywall.v1` to `protos/memorywall/v1`
and so on; the editable install resolves that with an import hook, which mypy and grimp
(import-linter) do not run. This builds `<dir>/memorywall/` out of symlinks, as
`[tool.setuptools] package-dir` maps it, so that with `<dir>` first on the path both see
the package whole.

    python .ci/typing_tree.py DIR           # build DIR/memorywall, print DIR
    TOOL | python .ci/typing_tree.py --unmap DIR   # DIR's paths back to the repository's
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"__pycache__"}


def package_dirs(pyproject: Path) -> dict[str, Path]:
    """Each mapped package name and the folder it lives in, from pyproject.toml."""
    setuptools = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = setuptools["package-dir"]
    return {name: (pyproject.parent / folder).resolve() for name, folder in mapping.items()}


def build(target: Path, mapping: dict[str, Path]) -> Path:
    """Lay out `target/<top package>`: a real folder wherever a mapped package sits inside
    another one, a symlink to the source everywhere else. Returns the top package's path."""
    tops = {name.split(".")[0] for name in mapping}
    if len(tops) != 1:
        raise SystemExit(f"typing_tree: expected one top-level package, got {sorted(tops)}")
    top = tops.pop()
    # Parents before children: a child's link goes inside the parent's laid-out folder.
    for name in sorted(mapping, key=lambda n: n.count(".")):
        where = target.joinpath(*name.split("."))
        nested = any(other.startswith(name + ".") for other in mapping)
        if not nested:
            if where.is_symlink() or where.exists():
                # A child mapped to the same name as a folder the parent already linked.
                where.unlink()
            where.symlink_to(mapping[name], target_is_directory=True)
            continue
        where.mkdir(parents=True, exist_ok=True)
        for entry in mapping[name].iterdir():
            if entry.name in SKIP or entry.name.endswith(".egg-info"):
                continue
            link = where / entry.name
            if not link.exists():
                link.symlink_to(entry, target_is_directory=entry.is_dir())
    return target / top


def unmap(text: str, target: Path, mapping: dict[str, Path]) -> str:
    """`text` with each path inside the tree written as the repository path it links to."""
    prefixes = sorted(
        (
            (f"{target.joinpath(*name.split('.'))}/", f"{folder.relative_to(ROOT)}/")
            for name, folder in mapping.items()
        ),
        key=lambda pair: len(pair[0]),
        reverse=True,
    )
    lines = []
    for line in text.splitlines(keepends=True):
        for tree_prefix, repo_prefix in prefixes:
            if tree_prefix in line:
                line = line.replace(tree_prefix, repo_prefix)
                break
        lines.append(line)
    return "".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--unmap"] and len(argv) == 2:
        sys.stdout.write(
            unmap(sys.stdin.read(), Path(argv[1]), package_dirs(ROOT / "pyproject.toml"))
        )
        return 0
    if len(argv) != 1:
        print("usage: typing_tree.py DIR | typing_tree.py --unmap DIR", file=sys.stderr)
        return 2
    target = Path(argv[0])
    if target.exists() and any(target.iterdir()):
        print(f"typing_tree: {target} is not empty", file=sys.stderr)
        return 2
    target.mkdir(parents=True, exist_ok=True)
    build(target, package_dirs(ROOT / "pyproject.toml"))
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
