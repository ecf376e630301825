"""The per-request files' three forms of message times (inline JSONL, a columnar .npz
beside the rows, none) and `read_requests`, which reads each back."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from memorywall.loadgen.records import (
    MessageTimes,
    RequestRecord,
    read_requests,
    write_requests,
)


def record(i: int, chunk_ns, chunk_tokens: list[int], error: str | None = None) -> RequestRecord:
    return RequestRecord(
        index=i,
        prompt_tokens=8,
        output_tokens=3,
        scheduled_ns=None if i % 2 else 5 * i,
        sent_ns=1_000 * i,
        chunk_ns=chunk_ns,
        chunk_tokens=chunk_tokens,
        finished_ns=None if error else 1_000 * i + 900,
        usage_completion_tokens=None if error else sum(chunk_tokens),
        modelled_ttft_s=1.5e-05,
        error=error,
        warmup=i == 0,
    )


def records() -> list[RequestRecord]:
    """A client's lists, the simulator's slices of one array, a refused request (no
    messages) and a multi-token message, in an order other than by index."""
    flat = np.array([1_100, 1_300, 3_100, 3_200, 3_900], dtype=np.int64)
    return [
        record(0, [100, 200], [1, 1]),
        record(3, flat[2:5], [1, 2, 1]),
        record(2, [], [], error="refused: too long"),
        record(1, flat[0:2], [1, 1]),
    ]


def plain(r: RequestRecord) -> dict:
    return r.as_dict()


def test_message_times_are_the_records_in_flat_arrays() -> None:
    m = MessageTimes.of(records())
    assert m.index.tolist() == [0, 3, 2, 1]
    assert m.ends.tolist() == [2, 5, 5, 7]
    assert m.ns.tolist() == [100, 200, 3_100, 3_200, 3_900, 1_100, 1_300]
    assert m.tokens.tolist() == [1, 1, 1, 2, 1, 1, 1]


def test_message_times_refuse_counts_that_do_not_match() -> None:
    with pytest.raises(ValueError, match="chunk_tokens"):
        MessageTimes.of([record(0, [1, 2], [1])])


@pytest.mark.parametrize("token_times", ["npz", "jsonl"])
def test_each_form_reads_back_the_records(tmp_path: Path, token_times: str) -> None:
    write_requests(tmp_path, "x-c1", records(), token_times=token_times)
    back = read_requests(tmp_path / "x-c1.requests.jsonl")
    assert [plain(r) for r in back] == [plain(r) for r in records()]
    assert all(type(t) is int for r in back for t in r.chunk_ns)
    rows = [json.loads(line) for line in (tmp_path / "x-c1.requests.jsonl").open()]
    assert ("chunk_ns" in rows[0]) == (token_times == "jsonl")
    assert (tmp_path / "x-c1.tokens.npz").exists() == (token_times == "npz")


def test_jsonl_form_is_the_rows_bench_always_wrote(tmp_path: Path) -> None:
    write_requests(tmp_path, "x", records(), token_times="jsonl")
    rows = [json.loads(line) for line in (tmp_path / "x.requests.jsonl").open()]
    assert rows == [dataclasses.asdict(RequestRecord(**plain(r))) for r in records()]


def test_npz_is_plain_numpy_and_the_same_bytes_each_time(tmp_path: Path) -> None:
    """Any numpy reads the file without pickles; a second write (an hour later, as far as
    the zip's dates go) gives the same bytes."""
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        write_requests(tmp_path / run, "x", records(), token_times="npz")
    a, b = (tmp_path / run / "x.tokens.npz" for run in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    with np.load(a, allow_pickle=False) as z:
        assert sorted(z.files) == ["ends", "index", "ns", "tokens"]
        assert z["ns"].dtype == np.int64 and z["ns"].size == 7
        assert z["tokens"].dtype == np.int32 and z["tokens"].tolist() == [1, 1, 1, 2, 1, 1, 1]
    assert {i.date_time for i in zipfile.ZipFile(a).infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_none_writes_rows_alone_and_clears_an_earlier_runs_times(tmp_path: Path) -> None:
    write_requests(tmp_path, "x", records(), token_times="npz")
    write_requests(tmp_path, "x", records(), token_times="none")
    assert not (tmp_path / "x.tokens.npz").exists()
    back = read_requests(tmp_path / "x.requests.jsonl")
    assert [r.sent_ns for r in back] == [r.sent_ns for r in records()]
    assert all(r.chunk_ns == [] for r in back)


def test_times_of_other_requests_are_refused(tmp_path: Path) -> None:
    write_requests(tmp_path, "x", records(), token_times="npz")
    (tmp_path / "two").mkdir()
    write_requests(tmp_path / "two", "x", records()[:2], token_times="none")
    (tmp_path / "x.tokens.npz").rename(tmp_path / "two" / "x.tokens.npz")
    with pytest.raises(ValueError, match="other requests"):
        read_requests(tmp_path / "two" / "x.requests.jsonl")


def test_an_unknown_form_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="npz, jsonl, none"):
        write_requests(tmp_path, "x", records(), token_times="csv")  # type: ignore[arg-type]


@pytest.mark.parametrize("token_times", ["jsonl", "npz", "none"])
def test_rows_are_each_records_as_dict_byte_for_byte(tmp_path: Path, token_times: str) -> None:
    """The rows are written in one encoder call: the bytes of encoding each record's
    `as_dict` on a line of its own."""
    from memorywall.loadgen import jsonl

    write_requests(tmp_path, "x", records(), token_times=token_times)
    rows = [r.as_dict(messages=token_times == "jsonl") for r in records()]
    jsonl.write_rows(tmp_path / "each.jsonl", rows)
    assert (tmp_path / "x.requests.jsonl").read_bytes() == (tmp_path / "each.jsonl").read_bytes()
