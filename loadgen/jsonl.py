"""JSON Lines for the per-request files: one compact JSON object per line, UTF-8.

`orjson` encodes and decodes when it is installed (a dependency; five times the standard
library's speed on a 10,000-request level's 1.3 million message times), else the
standard library does, in the same compact form. Either way a file's bytes depend on its
rows alone; the two spell some floats differently (`1e-05` and `0.00001`), never their
values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is absent
    # mypy's idiom for an optional module: the name is the module or None.
    orjson = None  # type: ignore[assignment]

__all__ = ["dumps_line", "read_rows", "write_objects", "write_rows"]


def _stdlib_line(row: Any) -> bytes:
    return (json.dumps(row, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


if orjson is not None:
    _OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY

    def dumps_line(row: Any) -> bytes:
        """`row` as one line of JSON, newline included."""
        return orjson.dumps(row, option=_OPTIONS)

    loads = orjson.loads
    DecodeError: type[ValueError] = orjson.JSONDecodeError
else:  # pragma: no cover
    dumps_line = _stdlib_line
    loads = json.loads
    DecodeError = json.JSONDecodeError


def write_rows(path: Path, rows: Iterable[Any]) -> None:
    """Write each row as a line of `path` (replacing it)."""
    with path.open("wb") as f:
        f.writelines(map(dumps_line, rows))


def write_objects(path: Path, rows: Sequence[Mapping[str, Any]], first_key: str) -> None:
    """Write each row, a flat JSON object whose first key is `first_key` (values numbers,
    strings, None, booleans, lists or numpy arrays of those: no nested object), as a line
    of `path`: the bytes `write_rows` writes, from one encoder call instead of one a row.

    orjson encodes the rows as one array, split into lines where one row's object ends and
    the next begins. That boundary, `},{"KEY":`, occurs nowhere else: a string value spells
    its quotes `\\"`, and a row holds no nested object to end in `}`. Rows that break
    these terms (a split count that is not one a row) are written a row at a time."""
    if orjson is None or not rows:  # pragma: no cover - orjson is a dependency
        write_rows(path, rows)
        return
    key = orjson.dumps(first_key)
    data = orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY)
    body = data[1:-1].replace(b"},{" + key + b":", b"}\n{" + key + b":")
    if body.count(b"}\n{") != len(rows) - 1 or not body.startswith(b"{" + key + b":"):
        write_rows(path, rows)
        return
    with path.open("wb") as f:
        f.write(body)
        f.write(b"\n")


def read_rows(path: Path) -> Iterator[Any]:
    """Each non-blank line of `path`, decoded; raises `DecodeError` (a ValueError) on a
    line that is not JSON."""
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                yield loads(line)
