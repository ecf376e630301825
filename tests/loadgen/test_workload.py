"""Workloads: length distributions, synthetic specs, JSONL traces, CLI length strings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from memorywall.loadgen.records import RequestSpec
from memorywall.loadgen.workload import (
    Fixed,
    Length,
    LogNormal,
    SyntheticWorkload,
    TraceRequest,
    TraceWorkload,
    Uniform,
    parse_length,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- length distributions -----------------------------------------------------------------


def test_fixed():
    out = Fixed(7).sample(rng(), 3)
    assert out.tolist() == [7, 7, 7]
    assert out.dtype == np.int64


@pytest.mark.parametrize(
    ("mean", "ratio", "low", "high"),
    [
        (10, 0.5, 5, 15),
        (3, 0.5, 1, 5),  # floor(1.5), ceil(4.5)
        (1, 0.5, 1, 2),  # floor(0.5) = 0 is raised to 1
        (100, 0.0, 100, 100),
        (7, 0.3, 4, 10),  # floor(4.9), ceil(9.1)
    ],
)
def test_uniform_bounds_match_vllm(mean, ratio, low, high):
    u = Uniform(mean, ratio)
    assert (u.low, u.high) == (low, high)
    out = u.sample(rng(), 5000)
    assert out.min() == low and out.max() == high  # both ends inclusive and reached


def test_uniform_is_rng_integers_closed_range():
    out = Uniform(10, 0.5).sample(rng(0), 6)
    np.testing.assert_array_equal(out, rng(0).integers(5, 16, size=6))
    assert out.tolist() == [14, 12, 10, 7, 8, 5]  # pinned for numpy's PCG64 stream


def test_uniform_mean():
    out = Uniform(512, 0.5).sample(rng(5), 200_000)
    assert out.min() == 256 and out.max() == 768
    assert out.mean() == pytest.approx(512, rel=0.01)


def test_lognormal_median_and_floor():
    out = LogNormal(512, 0.6).sample(rng(6), 200_000)
    assert np.median(out) == pytest.approx(512, rel=0.03)
    assert out.dtype == np.int64
    small = LogNormal(1, 2.0).sample(rng(6), 10_000)
    assert small.min() == 1  # clipped, never 0


def test_lognormal_exact_and_sigma_zero():
    out = LogNormal(100, 0.5).sample(rng(0), 4)
    expected = np.maximum(np.rint(rng(0).lognormal(math.log(100), 0.5, 4)), 1)
    np.testing.assert_array_equal(out, expected)
    assert LogNormal(100.4, 0.0).sample(rng(), 3).tolist() == [100, 100, 100]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Fixed(0),
        lambda: Fixed(-1),
        lambda: Fixed(1.5),
        lambda: Fixed(True),
        lambda: Uniform(0, 0.5),
        lambda: Uniform(10, 1.0),
        lambda: Uniform(10, -0.1),
        lambda: Uniform(10.5, 0.1),
        lambda: LogNormal(0, 0.5),
        lambda: LogNormal(10, -1),
        lambda: LogNormal(math.inf, 0.5),
        lambda: LogNormal(10, math.nan),
    ],
)
def test_bad_lengths(make):
    with pytest.raises(ValueError):
        make()


def test_lengths_satisfy_protocol():
    for length in (Fixed(1), Uniform(4, 0.5), LogNormal(4, 0.5)):
        assert isinstance(length, Length)


@pytest.mark.parametrize("n", [0, -1, 1.0])
def test_bad_n(n):
    with pytest.raises(ValueError, match="number of requests"):
        Uniform(4, 0.5).sample(rng(), n)


# ---- synthetic workload -------------------------------------------------------------------


def test_synthetic_specs_exact():
    wl = SyntheticWorkload(Uniform(100, 0.2), Fixed(8))
    g = rng(1)
    prompts = g.integers(80, 121, size=3)
    assert wl.specs(rng(1), 3) == [
        RequestSpec(index=i, prompt_tokens=int(p), output_tokens=8) for i, p in enumerate(prompts)
    ]


def test_synthetic_draw_order_inputs_then_outputs():
    wl = SyntheticWorkload(Uniform(100, 0.5), Uniform(20, 0.5))
    g = rng(2)
    prompts = Uniform(100, 0.5).sample(g, 4)
    outputs = Uniform(20, 0.5).sample(g, 4)
    out = wl.specs(rng(2), 4)
    assert [s.prompt_tokens for s in out] == prompts.tolist()
    assert [s.output_tokens for s in out] == outputs.tolist()
    assert all(s.offset_s is None for s in out)
    assert all(type(s.prompt_tokens) is int for s in out)


def test_synthetic_determinism():
    wl = SyntheticWorkload(LogNormal(512, 0.6), Uniform(128, 0.5))
    a = wl.specs(rng(9), 200)
    assert a == wl.specs(rng(9), 200)
    assert a != wl.specs(rng(10), 200)


# ---- traces -------------------------------------------------------------------------------


def write(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "trace.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_trace_with_arrivals(tmp_path):
    p = write(
        tmp_path,
        [
            '{"prompt_tokens": 512, "output_tokens": 128, "arrival_s": 0.25}',
            "",
            '{"prompt_tokens": 64, "output_tokens": 1, "arrival_s": 0.25, "extra": [1]}',
            '{"prompt_tokens": 8, "output_tokens": 2, "arrival_s": 3}',
        ],
    )
    wl = TraceWorkload.from_jsonl(p)
    assert len(wl) == 3 and wl.has_arrivals
    assert wl.specs(rng(0), 3) == [
        RequestSpec(0, 512, 128, 0.25),
        RequestSpec(1, 64, 1, 0.25),
        RequestSpec(2, 8, 2, 3.0),
    ]
    assert wl.specs(rng(1), 2) == wl.specs(rng(2), 2)  # the generator is ignored


def test_a_bench_runs_records_replay_when_its_server_received_them():
    def row(i, sent, received=None, warmup=False):
        return {
            "index": i,
            "prompt_tokens": 8,
            "output_tokens": 4,
            "sent_ns": sent,
            "server_received_ns": received,
            "warmup": warmup,
        }

    received = [row(0, 0, 9, warmup=True), row(1, 10, 12), row(2, 20, 21_000_012)]
    wl = TraceWorkload.from_records(received, "run")
    assert [s.offset_s for s in wl.specs(rng(), 2)] == pytest.approx([0.0, 0.021], abs=1e-12)
    # One row without the server's stamp (a server that did not say): the client's sends.
    sent = [*received[:2], row(2, 20_000_010, None)]
    offsets = [s.offset_s for s in TraceWorkload.from_records(sent, "run").specs(rng(), 2)]
    assert offsets == pytest.approx([0.0, 0.02], abs=1e-12)


def test_trace_without_arrivals_and_aliases(tmp_path):
    p = write(
        tmp_path,
        [
            '{"input_length": 10, "output_length": 3}',
            '{"input_tokens": 11, "output_tokens": 4}',
            '{"prompt_tokens": 12, "output_length": 5}',
        ],
    )
    wl = TraceWorkload.from_jsonl(str(p))
    assert not wl.has_arrivals
    assert [(s.prompt_tokens, s.output_tokens, s.offset_s) for s in wl.specs(rng(), 3)] == [
        (10, 3, None),
        (11, 4, None),
        (12, 5, None),
    ]


def test_trace_mooncake_timestamp_is_milliseconds(tmp_path):
    rows = [
        {"timestamp": 0, "input_length": 655, "output_length": 52, "hash_ids": [0, 1]},
        {"timestamp": 1500, "input_length": 100, "output_length": 5, "hash_ids": [2]},
    ]
    p = write(tmp_path, [json.dumps(r) for r in rows])
    assert [s.offset_s for s in TraceWorkload.from_jsonl(p).specs(rng(), 2)] == [0.0, 1.5]


def test_trace_asking_for_more_than_it_holds(tmp_path):
    wl = TraceWorkload((TraceRequest(1, 1),))
    with pytest.raises(ValueError, match="holds 1 requests, 2 asked for"):
        wl.specs(rng(), 2)


GOOD = '{"prompt_tokens": 5, "output_tokens": 5, "arrival_s": 1.0}'


@pytest.mark.parametrize(
    ("bad_line", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"output_tokens": 5, "arrival_s": 2}', "prompt_tokens: missing"),
        ('{"prompt_tokens": 5, "arrival_s": 2}', "output_tokens: missing"),
        ('{"prompt_tokens": 5.5, "output_tokens": 5, "arrival_s": 2}', "prompt_tokens: must be an"),
        ('{"prompt_tokens": "5", "output_tokens": 5, "arrival_s": 2}', "prompt_tokens: must be an"),
        (
            '{"prompt_tokens": true, "output_tokens": 5, "arrival_s": 2}',
            "prompt_tokens: must be an",
        ),
        (
            '{"prompt_tokens": 5, "output_tokens": null, "arrival_s": 2}',
            "output_tokens: must be an",
        ),
        ('{"prompt_tokens": 0, "output_tokens": 5, "arrival_s": 2}', "prompt_tokens: must be >= 1"),
        ('{"input_length": -3, "output_tokens": 5, "arrival_s": 2}', "input_length: must be >= 1"),
        ('{"prompt_tokens": 5, "output_length": 0, "arrival_s": 2}', "output_length: must be >= 1"),
        ('{"prompt_tokens": 5, "output_tokens": 5, "arrival_s": -1}', "arrival_s: must be >= 0"),
        ('{"prompt_tokens": 5, "output_tokens": 5, "arrival_s": "2"}', "arrival_s: must be a fin"),
        ('{"prompt_tokens": 5, "output_tokens": 5, "arrival_s": NaN}', "arrival_s: must be a fin"),
        ('{"prompt_tokens": 5, "output_tokens": 5, "arrival_s": 0.5}', "arrival_s: 0.5 s is bef"),
        ('{"prompt_tokens": 5, "output_tokens": 5, "timestamp": 500}', "arrival_s: 0.5 s is bef"),
        ('{"prompt_tokens": 5, "output_tokens": 5}', "arrival_s: line lacks"),
        ('{"prompt_tokens": 5, "input_length": 5, "output_tokens": 5}', "given twice"),
        ('{"prompt_tokens": 5, "output_tokens": 5, "arrival_s": 2, "timestamp": 2}', "given twice"),
    ],
)
def test_trace_bad_line_names_file_line_and_field(tmp_path, bad_line, match):
    p = write(tmp_path, [GOOD, "", bad_line, GOOD])
    with pytest.raises(ValueError, match=match) as e:
        TraceWorkload.from_jsonl(p)
    message = str(e.value)
    assert message.startswith(f"{p}:3: ")
    assert "\n" not in message


def test_trace_arrival_on_later_line_only(tmp_path):
    p = write(tmp_path, ['{"prompt_tokens": 5, "output_tokens": 5}', GOOD])
    with pytest.raises(ValueError, match=rf"^{p}:2: arrival_s: line has an arrival"):
        TraceWorkload.from_jsonl(p)


def test_trace_empty_file(tmp_path):
    p = write(tmp_path, ["", "  "])
    with pytest.raises(ValueError, match="no requests"):
        TraceWorkload.from_jsonl(p)


# ---- CLI length strings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512", Fixed(512)),
        (" 64 ", Fixed(64)),
        ("uniform:512:0.5", Uniform(512, 0.5)),
        ("uniform:512:0", Uniform(512, 0.0)),
        ("lognormal:512:0.6", LogNormal(512.0, 0.6)),
        ("LogNormal:100.5:1", LogNormal(100.5, 1.0)),
    ],
)
def test_parse_length(text, expected):
    parsed = parse_length(text)
    assert parsed == expected
    assert parse_length(str(parsed)) == parsed  # str() round-trips


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "expected '<tokens>'"),
        ("abc", "expected '<tokens>'"),
        ("1.5", "expected '<tokens>'"),
        ("uniform", "expected '<tokens>'"),
        ("uniform:512", "expected '<tokens>'"),
        ("uniform:512:0.5:1", "expected '<tokens>'"),
        ("normal:512:0.5", "expected '<tokens>'"),
        ("0", "tokens must be an integer >= 1"),
        ("-3", "tokens must be an integer >= 1"),
        ("uniform:x:0.5", "mean must be an integer"),
        ("uniform:512.5:0.5", "mean must be an integer"),
        ("uniform:512:1", r"range_ratio must be in \[0, 1\)"),
        ("uniform:512:abc", "range_ratio must be a number"),
        ("lognormal:0:0.5", "median must be a finite number > 0"),
        ("lognormal:512:-1", "sigma must be a finite number >= 0"),
        ("lognormal:512:inf", "sigma must be finite"),
    ],
)
def test_parse_length_bad(text, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_length(text)
    assert str(e.value).startswith(f"bad length {text!r}: ")
    assert "\n" not in str(e.value)


def test_a_bench_runs_records_replay_their_send_times(tmp_path):
    """A bench per-request file is a trace: sends after the first non-warm-up one become
    arrivals, warm-ups are left out, lengths are those asked for."""
    from memorywall.loadgen.records import RequestRecord

    rows = [
        RequestRecord(
            index=0, prompt_tokens=9, output_tokens=3, scheduled_ns=None, sent_ns=1_000, warmup=True
        ),
        RequestRecord(
            index=2, prompt_tokens=16, output_tokens=4, scheduled_ns=None, sent_ns=7_500_000_000
        ),
        RequestRecord(
            index=1, prompt_tokens=32, output_tokens=8, scheduled_ns=None, sent_ns=5_000_000_000
        ),
    ]
    p = write(tmp_path, [json.dumps(r.as_dict()) for r in rows])
    wl = TraceWorkload.from_jsonl(p)
    assert wl.has_arrivals
    assert wl.specs(rng(0), 2) == [RequestSpec(0, 32, 8, 0.0), RequestSpec(1, 16, 4, 2.5)]


def test_a_bench_file_of_warm_ups_only_is_refused(tmp_path):
    row = {"index": 0, "prompt_tokens": 9, "output_tokens": 3, "sent_ns": 5, "warmup": True}
    with pytest.raises(ValueError, match="no requests but warm-ups"):
        TraceWorkload.from_jsonl(write(tmp_path, [json.dumps(row)]))
