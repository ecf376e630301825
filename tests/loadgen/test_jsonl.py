"""The per-request files: compact JSON Lines, read back the same whatever wrote them."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from memorywall.loadgen import jsonl
from memorywall.loadgen.records import RequestRecord
from memorywall.loadgen.workload import TraceWorkload


def record(i: int, chunk_ns) -> RequestRecord:
    return RequestRecord(
        index=i,
        prompt_tokens=8,
        output_tokens=3,
        scheduled_ns=None,
        sent_ns=1_000 * i,
        chunk_ns=chunk_ns,
        chunk_tokens=[1, 2],
        finished_ns=1_000 * i + 900,
        usage_completion_tokens=3,
        modelled_ttft_s=1.5e-05,
        server_received_ns=1_000 * i + 7,
        error="boom: é" if i == 2 else None,
        warmup=i == 0,
    )


def records() -> list[RequestRecord]:
    flat = np.array([100, 200, 1_100, 1_300, 2_100, 2_900], dtype=np.int64)
    return [record(0, [100, 200]), record(1, flat[2:4]), record(2, flat[4:6])]


def test_as_dict_is_asdict_with_plain_lists() -> None:
    for r in records():
        expected = dataclasses.asdict(dataclasses.replace(r, chunk_ns=list(map(int, r.chunk_ns))))
        got = r.as_dict()
        assert got == expected and list(got) == list(expected)
        assert all(type(t) is int for t in got["chunk_ns"])
        assert got["chunk_tokens"] is not r.chunk_tokens  # a copy: the row owns its lists


def test_rows_round_trip_and_both_encoders_agree(tmp_path: Path) -> None:
    rows = [r.as_dict() for r in records()]
    path = tmp_path / "x.requests.jsonl"
    jsonl.write_rows(path, rows)
    assert list(jsonl.read_rows(path)) == rows
    assert [RequestRecord(**row) for row in jsonl.read_rows(path)][1].chunk_ns == [1_100, 1_300]
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3 and all(b", " not in line for line in lines)  # compact
    for row, line in zip(rows, lines, strict=True):
        stdlib = jsonl._stdlib_line(row)
        assert stdlib.endswith(b"\n") and json.loads(stdlib) == json.loads(line) == row
    jsonl.write_rows(tmp_path / "again.jsonl", [r.as_dict() for r in records()])
    assert (tmp_path / "again.jsonl").read_bytes() == path.read_bytes()


def test_files_the_old_writer_made_still_replay(tmp_path: Path) -> None:
    """Before the compact encoder: `json.dumps(row)` per line, spaces after separators."""
    old, new = tmp_path / "old.requests.jsonl", tmp_path / "new.requests.jsonl"
    rows = [r.as_dict() for r in records()]
    old.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n")  # and a blank line
    jsonl.write_rows(new, rows)
    assert list(jsonl.read_rows(old)) == list(jsonl.read_rows(new)) == rows
    a, b = TraceWorkload.from_jsonl(old), TraceWorkload.from_jsonl(new)
    assert a.requests == b.requests and [r.arrival_s for r in a.requests] == [0.0, 1e-06]


def test_without_orjson_the_standard_library_writes_and_reads(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("orjson")
    rows = [r.as_dict() for r in records()]
    jsonl.write_rows(tmp_path / "fast.jsonl", rows)
    monkeypatch.setitem(sys.modules, "orjson", None)  # as if not installed
    try:
        importlib.reload(jsonl)
        assert jsonl.orjson is None and jsonl.dumps_line is jsonl._stdlib_line
        jsonl.write_rows(tmp_path / "slow.jsonl", rows)
        assert list(jsonl.read_rows(tmp_path / "fast.jsonl")) == rows
        slow = (tmp_path / "slow.jsonl").read_bytes()
    finally:
        monkeypatch.undo()
        importlib.reload(jsonl)
    assert jsonl.orjson is not None
    assert list(jsonl.read_rows(tmp_path / "slow.jsonl")) == rows
    # The same compact form: only the spelling of some floats differs.
    assert slow.replace(b"1.5e-05", b"0.000015") == (tmp_path / "fast.jsonl").read_bytes()


def tricky_rows() -> list[dict]:
    """Rows whose strings spell the split point and a line break, with numpy slices."""
    flat = np.arange(10, dtype=np.int64)
    return [
        {"index": 0, "error": '},{"index": 1', "chunk_ns": flat[0:3], "x": 1.5e-05},
        {"index": 1, "error": "a}\n{b", "chunk_ns": [], "x": None},
        {"index": 2, "error": None, "chunk_ns": flat[3:10], "x": True},
    ]


def plain(rows: list[dict]) -> list[dict]:
    return [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()} for r in rows]


@pytest.mark.parametrize("count", [0, 1, 3])
def test_write_objects_writes_write_rows_bytes_in_one_call(tmp_path: Path, count: int) -> None:
    pytest.importorskip("orjson")
    rows = tricky_rows()[:count]
    jsonl.write_objects(tmp_path / "one.jsonl", rows, "index")
    jsonl.write_rows(tmp_path / "each.jsonl", plain(rows))
    got = (tmp_path / "one.jsonl").read_bytes()
    assert got == (tmp_path / "each.jsonl").read_bytes()
    assert got.count(b"\n") == count
    assert list(jsonl.read_rows(tmp_path / "one.jsonl")) == plain(rows)


def test_write_objects_falls_back_when_a_row_starts_with_another_key(tmp_path: Path) -> None:
    rows = [{"index": 0, "a": 1}, {"a": 2, "index": 1}, {"index": 2, "nested": {"index": 3}}]
    jsonl.write_objects(tmp_path / "one.jsonl", rows, "index")
    jsonl.write_rows(tmp_path / "each.jsonl", rows)
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "each.jsonl").read_bytes()
    assert list(jsonl.read_rows(tmp_path / "one.jsonl")) == rows
