"""benchmarks/mocker_compare.py's own logic: the trace both replays read, the held rule,
the verdict. (Running Dynamo needs its venv; `--quick` is the end-to-end check.)"""

import argparse
import json

import pytest

from benchmarks.mocker_compare import (
    ENGINES,
    TRACE_BLOCK_TOKENS,
    row,
    stream_counts,
    verdict,
    write_trace,
)
from memorywall.loadgen.records import RequestRecord
from memorywall.loadgen.workload import TraceWorkload


def _record(index: int, sent_ns: int, prompt: int = 256) -> RequestRecord:
    return RequestRecord(index, prompt, 128, None, sent_ns)


def test_trace_keeps_live_arrivals_in_order_for_memorywall(tmp_path):
    trace = tmp_path / "t.jsonl"
    records = [_record(0, 5_000_000_000), _record(1, 4_000_000_000, 100), _record(2, 4_500_000)]
    assert write_trace(records, trace) == 3
    specs = TraceWorkload.from_jsonl(trace, block_tokens=TRACE_BLOCK_TOKENS).specs(None, 3)
    assert [s.offset_s for s in specs] == pytest.approx([0.0, 3.9955, 4.9955])
    assert [s.prompt_tokens for s in specs] == [256, 100, 256]
    assert {s.output_tokens for s in specs} == {128}


def test_trace_gives_each_prompt_its_own_blocks(tmp_path):
    trace = tmp_path / "t.jsonl"
    write_trace([_record(0, 1), _record(1, 2, 100), _record(2, 3, 65)], trace)
    ids = [json.loads(line)["hash_ids"] for line in trace.read_text().splitlines()]
    assert [len(i) for i in ids] == [4, 2, 2]  # 64-token blocks, the last one partial
    flat = [h for i in ids for h in i]
    assert len(set(flat)) == len(flat)  # no prefix shared between random prompts


def _live(tpot_ms: float, tok_s: float = 1000.0, failed: int = 0) -> dict:
    return {
        "mean_tpot_ms": tpot_ms,
        "failed": failed,
        "completed": 10,
        "output_throughput": tok_s,
        "p99_itl_ms": 1.0,
        "mean_modelled_tpot_ms": None,
        "suspect": [],
    }


def _expected(tpot_ms: float = 10.0) -> dict:
    return {"tpot_ms": tpot_ms, "p99_itl_ms": 1.0, "ideal_tok_s": 2000.0}


@pytest.mark.parametrize(
    ("tpot_ms", "failed", "held"),
    [(10.19, 0, True), (9.81, 0, True), (10.3, 0, False), (9.7, 0, False), (10.0, 1, False)],
)
def test_held_is_within_two_percent_either_way_with_no_failure(tpot_ms, failed, held):
    r = row(
        ENGINES[0], 16, 0.5, _live(tpot_ms, failed=failed), _expected(), {"cpu_us_per_token": 1}
    )
    assert r["held"] is held
    assert r["tpot_error"] == pytest.approx(tpot_ms / 10.0 - 1)


def test_verdict_takes_the_best_held_rate_per_speed():
    mocker_1x, memorywall_1x, mocker_10x, memorywall_10x = ENGINES
    extra = {"cpu_us_per_token": 1}
    rows = [
        row(mocker_1x, 16, 0.5, _live(10.0, 2000.0), _expected(), extra),
        row(mocker_1x, 64, 0.5, _live(10.0, 6000.0), _expected(), extra),
        row(mocker_1x, 256, 0.5, _live(20.0, 9000.0), _expected(), extra),  # late: not held
        row(memorywall_1x, 256, 0.5, _live(10.0, 12000.0), _expected(), extra),
        row(mocker_10x, 16, 0.5, _live(20.0, 9000.0), _expected(), extra),
        row(memorywall_10x, 16, 0.5, _live(10.0, 20000.0), _expected(), extra),
    ]
    h100, fast, whole = verdict(rows)
    assert "memorywall 12,000 tok/s (256 streams" in h100
    assert "mocker 6,000 tok/s (64 streams" in h100
    assert h100.endswith(": 2.00x")
    assert "mocker 0 tok/s (no level held)" in fast
    assert fast.endswith(": n/a")
    assert "memorywall 20,000 tok/s" in whole
    assert whole.endswith(": 3.33x")


@pytest.mark.parametrize("text", ["", "16,x", "0", "16,-4"])
def test_levels_refuse_what_is_not_a_stream_count(text):
    with pytest.raises(argparse.ArgumentTypeError, match="stream counts"):
        stream_counts(text)


def test_levels_read_stream_counts():
    assert stream_counts("16,64,1024") == [16, 64, 1024]
