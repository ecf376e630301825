"""Each formula in memorywall.loadgen.metrics checked by hand on nanosecond timestamps."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from memorywall.loadgen.metrics import (
    METRICS,
    NO_TOKENS_ERROR,
    Distribution,
    RunMetrics,
    Slo,
    compute_metrics,
    parse_slo,
)
from memorywall.loadgen.records import RequestRecord

MS = 1_000_000  # ns
S = 1_000_000_000  # ns


def rec(
    index: int = 0,
    *,
    sent: int = 10 * S,
    offsets_ms: tuple[float, ...] = (100.0,),
    tokens: tuple[int, ...] | None = None,
    scheduled: int | None = None,
    **kw: object,
) -> RequestRecord:
    chunks = [sent + int(o * MS) for o in offsets_ms]
    return RequestRecord(
        index=index,
        prompt_tokens=kw.pop("prompt_tokens", 10),  # type: ignore[arg-type]
        output_tokens=kw.pop("output_tokens", 16),  # type: ignore[arg-type]
        scheduled_ns=scheduled,
        sent_ns=sent,
        chunk_ns=chunks,
        chunk_tokens=list(tokens) if tokens is not None else [1] * len(chunks),
        **kw,  # type: ignore[arg-type]
    )


# A request sent at 10 s; messages at +100, +150, +250 ms carrying 1, 2 and 1 tokens.
def multi_token() -> RequestRecord:
    return rec(offsets_ms=(100, 150, 250), tokens=(1, 2, 1), scheduled=10 * S - 20 * MS)


def test_ttft_e2el_tpot_by_hand() -> None:
    m = compute_metrics([multi_token()]).as_dict()
    assert m["mean_ttft_ms"] == pytest.approx(100.0)
    assert m["mean_e2el_ms"] == pytest.approx(250.0)
    # 4 tokens: (250 - 100) / (4 - 1)
    assert m["mean_tpot_ms"] == pytest.approx(50.0)
    assert m["mean_output_tok_s_per_user"] == pytest.approx(20.0)


def test_itl_spreads_a_multi_token_gap_over_its_tokens() -> None:
    m = compute_metrics([multi_token()])
    itl = m.distributions["itl"]
    assert itl is not None
    # gap 50 ms ends in a 2-token message -> 25, 25; gap 100 ms, 1 token -> 100.
    assert itl.count == 3
    assert itl.mean == pytest.approx(0.050)
    assert itl.median == pytest.approx(0.025)
    assert itl.percentiles[99.0] == pytest.approx(np.percentile([0.025, 0.025, 0.1], 99))


def test_itl_with_one_token_per_message_is_vllms_message_gaps() -> None:
    r = rec(offsets_ms=(100, 130, 170, 180))
    itl = compute_metrics([r]).distributions["itl"]
    assert itl is not None and itl.count == 3
    assert itl.mean == pytest.approx((0.030 + 0.040 + 0.010) / 3)


def test_extra_tokens_in_first_message_get_no_itl() -> None:
    r = rec(offsets_ms=(100, 200), tokens=(3, 1))
    m = compute_metrics([r])
    itl = m.distributions["itl"]
    assert itl is not None and itl.count == 1 and itl.mean == pytest.approx(0.1)
    # TPOT still divides by completion_tokens - 1 = 3.
    assert m.as_dict()["mean_tpot_ms"] == pytest.approx(100 / 3)


def test_usage_completion_tokens_win_over_counted_tokens() -> None:
    r = rec(offsets_ms=(100, 200), usage_completion_tokens=5, usage_prompt_tokens=7)
    m = compute_metrics([r], duration_s=1.0)
    assert m.total_output_tokens == 5 and m.total_input_tokens == 7
    assert m.as_dict()["mean_tpot_ms"] == pytest.approx(100 / 4)


def test_scheduled_variants_and_send_lag() -> None:
    m = compute_metrics([multi_token()]).as_dict()
    assert m["mean_ttft_scheduled_ms"] == pytest.approx(120.0)
    assert m["mean_e2el_scheduled_ms"] == pytest.approx(270.0)
    assert m["mean_send_lag_ms"] == pytest.approx(20.0)


def test_scheduled_variants_none_in_closed_loop() -> None:
    m = compute_metrics([rec(offsets_ms=(100, 200))]).as_dict()
    for name in ("ttft_scheduled", "e2el_scheduled", "send_lag"):
        assert m[f"mean_{name}_ms"] is None
        assert m[f"p99_{name}_ms"] is None


def test_send_lag_counts_failed_requests_too() -> None:
    bad = rec(1, sent=10 * S, offsets_ms=(), scheduled=10 * S - 5 * MS, error="boom")
    m = compute_metrics([multi_token(), bad])
    lag = m.distributions["send_lag"]
    assert lag is not None and lag.count == 2
    assert lag.mean == pytest.approx((0.020 + 0.005) / 2)


def test_throughputs_over_first_send_to_last_receipt() -> None:
    a = rec(0, sent=10 * S, offsets_ms=(100, 200), prompt_tokens=10)  # ends 10.2 s
    b = rec(1, sent=10 * S + 500 * MS, offsets_ms=(100, 200, 300, 1500), prompt_tokens=30)
    m = compute_metrics([a, b])  # b ends at 12.0 s
    assert m.duration_s == pytest.approx(2.0)
    d = m.as_dict()
    assert d["duration"] == pytest.approx(2.0)
    assert d["completed"] == 2 and d["failed"] == 0
    assert d["total_input_tokens"] == 40 and d["total_output_tokens"] == 6
    assert d["request_throughput"] == pytest.approx(1.0)
    assert d["output_throughput"] == pytest.approx(3.0)
    assert d["total_token_throughput"] == pytest.approx(23.0)


def test_finished_ns_extends_the_duration() -> None:
    r = rec(offsets_ms=(100,), finished_ns=10 * S + 400 * MS)
    assert compute_metrics([r]).duration_s == pytest.approx(0.4)


def test_explicit_duration_overrides() -> None:
    m = compute_metrics([multi_token()], duration_s=4.0)
    assert m.duration_s == 4.0
    assert m.request_throughput == pytest.approx(0.25)
    assert m.output_throughput == pytest.approx(1.0)


def test_errors_and_warmups_excluded_and_counted() -> None:
    good = multi_token()
    warm = rec(1, offsets_ms=(1, 2, 3), warmup=True, sent=0)
    err1 = rec(2, offsets_ms=(), error="HTTP 500")
    err2 = rec(3, offsets_ms=(5,), error="HTTP 500")  # partial stream, then an error
    err3 = rec(4, offsets_ms=(), error="timeout")
    silent = rec(5, offsets_ms=())  # no error string, but no token either
    m = compute_metrics([good, warm, err1, err2, err3, silent])
    assert (m.completed, m.failed, m.warmup) == (1, 4, 1)
    assert m.errors == {"HTTP 500": 2, "timeout": 1, NO_TOKENS_ERROR: 1}
    d = m.as_dict()
    assert d["error_counts"] == {"HTTP 500": 2, "timeout": 1, NO_TOKENS_ERROR: 1}
    assert d["warmup_requests"] == 1
    ttft = m.distributions["ttft"]
    assert ttft is not None and ttft.count == 1 and ttft.mean == pytest.approx(0.1)
    assert m.total_output_tokens == 4
    # Warm-up at t=0 does not stretch the duration: first send 10 s, last receipt 10.25 s.
    assert m.duration_s == pytest.approx(0.25)


def test_no_data_is_none_not_zero() -> None:
    m = compute_metrics([])
    d = m.as_dict()
    assert d["duration"] is None
    for key in ("request_throughput", "output_throughput", "total_token_throughput"):
        assert d[key] is None
    assert d["request_goodput"] is None
    for mdef in METRICS:
        assert m.distributions[mdef.name] is None
    stat_keys = [k for k in d if k.startswith(("mean_", "median_", "std_", "p"))]
    assert stat_keys and all(d[k] is None for k in stat_keys)
    assert d["completed"] == 0 and d["failed"] == 0
    json.dumps(d)  # JSON null, not NaN
    assert all(v != "0.00" for label, v in m.table_rows() if "(ms)" in label)


def test_all_failed_run_has_no_latency() -> None:
    m = compute_metrics([rec(offsets_ms=(), error="x", finished_ns=11 * S)])
    d = m.as_dict()
    assert d["mean_ttft_ms"] is None and d["p99_e2el_ms"] is None
    assert d["request_throughput"] == 0.0  # measured: 0 completions in 1 s


def test_single_token_requests_have_no_tpot() -> None:
    m = compute_metrics([rec(offsets_ms=(100,)), rec(1, offsets_ms=(80,))])
    d = m.as_dict()
    assert d["mean_ttft_ms"] == pytest.approx(90.0)
    assert d["mean_tpot_ms"] is None and d["median_tpot_ms"] is None
    assert d["mean_itl_ms"] is None
    assert d["mean_output_tok_s_per_user"] is None


def test_tpot_pools_only_multi_token_requests() -> None:
    m = compute_metrics([multi_token(), rec(1, offsets_ms=(100,))])
    tpot = m.distributions["tpot"]
    assert tpot is not None and tpot.count == 1 and tpot.mean == pytest.approx(0.05)


# Goodput: requests with TTFT, TPOT, E2EL (ms) of (100, 50, 250) and (300, 10, 330).
def goodput_records() -> list[RequestRecord]:
    slow_start = rec(1, sent=10 * S, offsets_ms=(300, 310, 320, 330), scheduled=9 * S)
    return [multi_token(), slow_start]


@pytest.mark.parametrize(
    ("slo", "good"),
    [
        (Slo(ttft_s=0.2), 1),
        (Slo(ttft_s=0.3), 2),  # bounds are inclusive
        (Slo(tpot_s=0.02), 1),
        (Slo(tpot_s=0.05), 2),
        (Slo(e2el_s=0.3), 1),
        (Slo(e2el_s=0.25), 1),
        (Slo(ttft_s=0.2, tpot_s=0.02), 0),
        (Slo(ttft_s=1.0, tpot_s=1.0, e2el_s=1.0), 2),
    ],
)
def test_goodput_per_slo_type(slo: Slo, good: int) -> None:
    m = compute_metrics(goodput_records(), slo=slo, duration_s=2.0)
    assert m.good_requests == good
    assert m.as_dict()["request_goodput"] == pytest.approx(good / 2.0)


def test_goodput_single_token_passes_tpot_bound_like_vllm() -> None:
    m = compute_metrics([rec(offsets_ms=(100,))], slo=Slo(tpot_s=0.0), duration_s=1.0)
    assert m.good_requests == 1


def test_goodput_from_schedule() -> None:
    # From schedule the second request's TTFT is 1.3 s and E2EL 1.33 s.
    m = compute_metrics(goodput_records(), slo=Slo(ttft_s=0.5), duration_s=1.0)
    assert m.request_goodput == pytest.approx(2.0)
    assert m.request_goodput_scheduled == pytest.approx(1.0)


def test_goodput_from_schedule_none_without_schedule() -> None:
    m = compute_metrics([rec(offsets_ms=(100,))], slo=Slo(ttft_s=1.0), duration_s=1.0)
    assert m.request_goodput == 1.0 and m.request_goodput_scheduled is None


def test_goodput_none_without_slo() -> None:
    m = compute_metrics(goodput_records(), duration_s=1.0)
    assert m.good_requests is None and m.as_dict()["request_goodput"] is None


def test_statistics_match_numpy() -> None:
    g = np.random.default_rng(7)
    records = []
    for i in range(50):
        sent = 10 * S + i * 37 * MS
        n = int(g.integers(1, 8))
        offsets = np.cumsum(g.uniform(1, 90, size=n)).round(3)
        toks = g.integers(1, 4, size=n)
        records.append(rec(i, sent=sent, offsets_ms=tuple(offsets), tokens=tuple(toks)))
    m = compute_metrics(records, percentiles=(50, 90, 95, 99, 99.9))
    d = m.as_dict()
    ttfts = np.array([(r.chunk_ns[0] - r.sent_ns) / 1e6 for r in records])
    e2els = np.array([(r.chunk_ns[-1] - r.sent_ns) / 1e6 for r in records])
    tpots = np.array(
        [
            ((r.chunk_ns[-1] - r.chunk_ns[0]) / 1e6) / (sum(r.chunk_tokens) - 1)
            for r in records
            if sum(r.chunk_tokens) > 1
        ]
    )
    for name, ref in (("ttft", ttfts), ("e2el", e2els), ("tpot", tpots)):
        assert d[f"mean_{name}_ms"] == pytest.approx(np.mean(ref))
        assert d[f"median_{name}_ms"] == pytest.approx(np.median(ref))
        assert d[f"std_{name}_ms"] == pytest.approx(np.std(ref))
        for p, word in ((50, "50"), (90, "90"), (95, "95"), (99, "99"), (99.9, "99.9")):
            assert d[f"p{word}_{name}_ms"] == pytest.approx(np.percentile(ref, p))
    # ITL is pooled per token: its sum is the decode span of every request.
    itl = m.distributions["itl"]
    assert itl is not None
    spans = sum(r.chunk_ns[-1] - r.chunk_ns[0] for r in records) / 1e9
    assert itl.mean * itl.count == pytest.approx(spans)
    assert itl.count == sum(sum(r.chunk_tokens[1:]) for r in records)


def test_modelled_values_beside_measured() -> None:
    r = rec(
        offsets_ms=(100, 200, 300),
        modelled_ttft_s=0.09,
        modelled_e2e_s=0.29,
        modelled_decode_s=0.2,
    )
    d = compute_metrics([r]).as_dict()
    assert d["mean_modelled_ttft_ms"] == pytest.approx(90.0)
    assert d["mean_modelled_tpot_ms"] == pytest.approx(100.0)
    assert d["mean_modelled_e2el_ms"] == pytest.approx(290.0)
    assert d["mean_tpot_ms"] == pytest.approx(100.0)


def test_modelled_tpot_falls_back_to_e2e_minus_ttft() -> None:
    r = rec(offsets_ms=(100, 200, 300), modelled_ttft_s=0.1, modelled_e2e_s=0.5)
    assert compute_metrics([r]).as_dict()["mean_modelled_tpot_ms"] == pytest.approx(200.0)


def test_modelled_none_against_other_servers() -> None:
    d = compute_metrics([multi_token()]).as_dict()
    assert d["mean_modelled_ttft_ms"] is None and d["mean_modelled_tpot_ms"] is None


def test_times_going_backwards_are_rejected() -> None:
    with pytest.raises(ValueError, match="record 3"):
        compute_metrics([rec(3, offsets_ms=(100, 50))])
    with pytest.raises(ValueError, match="backwards"):
        compute_metrics([rec(offsets_ms=(-1,))])


def test_vllm_keys_present() -> None:
    d = compute_metrics([multi_token()]).as_dict()
    vllm_keys = [
        "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
        "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    ]  # fmt: skip
    for name in ("ttft", "tpot", "itl", "e2el"):
        vllm_keys += [f"{s}_{name}_ms" for s in ("mean", "median", "std", "p50", "p90", "p99")]
    assert set(vllm_keys) <= set(d)
    assert all(isinstance(v, (int, float, dict)) or v is None for v in d.values())


def test_table_rows() -> None:
    m = compute_metrics([multi_token()], slo=Slo(ttft_s=1.0))
    rows = dict(m.table_rows())
    assert rows["Successful requests"] == "1"
    assert rows["Mean TTFT (ms)"] == "100.00"
    assert rows["P99 ITL (ms)"] == f"{np.percentile([25, 25, 100], 99):.2f}"
    assert rows["Request goodput (req/s)"] == "4.00"
    assert "Mean Modelled TTFT (ms)" not in rows  # optional and absent
    single = dict(compute_metrics([rec()]).table_rows())
    assert single["Mean TPOT (ms)"] == "n/a"


def test_run_metrics_is_frozen() -> None:
    m = compute_metrics([multi_token()])
    assert isinstance(m, RunMetrics)
    with pytest.raises(AttributeError):
        m.completed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ttft=500ms,tpot=30ms,e2el=2s", Slo(ttft_s=0.5, tpot_s=0.03, e2el_s=2.0)),
        ("ttft=500ms", Slo(ttft_s=0.5)),
        (" tpot = 30 ms ", Slo(tpot_s=0.03)),
        ("e2el=1.5s,ttft=250000us", Slo(e2el_s=1.5, ttft_s=0.25)),
        ("tpot=5e-3s", Slo(tpot_s=0.005)),
        ("ttft=0ms", Slo(ttft_s=0.0)),
        ("ttft=100000000ns", Slo(ttft_s=0.1)),
    ],
)
def test_parse_slo_good(text: str, expected: Slo) -> None:
    got = parse_slo(text)
    for attr in ("ttft_s", "tpot_s", "e2el_s"):
        assert getattr(got, attr) == pytest.approx(getattr(expected, attr))


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("ttft=500ms,,tpot=3ms", "empty item"),
        ("ttft=500ms,", "empty item"),
        ("latency=500ms", "'latency'"),
        ("ttft=500", "missing unit"),
        ("ttft=-5ms", "'ttft=-5ms'"),
        ("ttft=500ms,ttft=1s", "twice"),
        ("ttft", "key=value"),
        ("ttft=", "'ttft='"),
        ("ttft=fastms", "'ttft=fastms'"),
        ("ttft=1.2.3ms", "'1.2.3'"),
        ("ttft=500 minutes", "'ttft=500 minutes'"),
        ("ttft=infms", "'ttft=infms'"),
    ],
)
def test_parse_slo_bad(text: str, names: str) -> None:
    with pytest.raises(ValueError, match="SLO") as exc:
        parse_slo(text)
    msg = str(exc.value)
    assert names in msg and "\n" not in msg


def test_slo_needs_a_bound_and_no_negatives() -> None:
    with pytest.raises(ValueError, match="no bound"):
        Slo()
    with pytest.raises(ValueError, match="tpot_s"):
        Slo(tpot_s=-1.0)


def test_messages_without_counts_count_one_token_each() -> None:
    counted = multi_token()  # gaps 50 ms (2 tokens) and 100 ms
    uncounted = rec(1, offsets_ms=(100, 130, 170), tokens=(), usage_completion_tokens=3)
    itl = compute_metrics([counted, uncounted]).distributions["itl"]
    assert itl is not None and itl.count == 3 + 2
    assert itl.mean == pytest.approx((0.025 + 0.025 + 0.1 + 0.03 + 0.04) / 5)


def test_simulator_arrays_give_a_clients_metrics() -> None:
    """The simulator hands each record a slice of one int64 array where a client appends
    to a list: the same metrics to the last bit, the same JSON."""
    g = np.random.default_rng(3)
    lists = []
    for i in range(40):
        n = int(g.integers(0, 6))
        offsets = tuple(np.cumsum(g.uniform(1, 90, size=n)).round(3))
        lists.append(
            rec(
                i,
                sent=10 * S + i * 7 * MS,
                offsets_ms=offsets,
                tokens=tuple(g.integers(1, 3, size=n).tolist()) if i % 3 else None,
                scheduled=None if i % 4 else 10 * S,
                error="boom" if i % 9 == 5 else None,
                warmup=i == 0,
                modelled_ttft_s=0.01 * i if i % 2 else None,
            )
        )
    flat = np.array([t for r in lists for t in r.chunk_ns], dtype=np.int64)
    ends = np.cumsum([len(r.chunk_ns) for r in lists])
    arrays = [
        dataclasses.replace(r, chunk_ns=flat[end - len(r.chunk_ns) : end])
        for r, end in zip(lists, ends, strict=True)
    ]
    slo = Slo(ttft_s=0.05, tpot_s=0.03)
    assert compute_metrics(arrays, slo=slo).as_dict() == compute_metrics(lists, slo=slo).as_dict()
    assert [json.dumps(r.as_dict()) for r in arrays] == [json.dumps(r.as_dict()) for r in lists]


@pytest.mark.parametrize("seed", range(4))
def test_median_and_percentiles_are_numpys_to_the_bit(seed: int) -> None:
    g = np.random.default_rng(seed)
    pcts = (0.0, 12.5, 50.0, 90.0, 95.0, 99.0, 99.9, 100.0)
    for n in (1, 2, 3, 10, 11, 1000, 1001, 200_000):  # 200,000: a run's pooled ITLs
        for values in (g.lognormal(size=n), g.choice([1e-3, 0.01, 0.0125, 7.0], size=n)):
            d = Distribution.of(values, pcts)
            assert d is not None and d.median == np.median(values)
            assert list(d.percentiles.values()) == np.percentile(values, pcts).tolist()


def test_percentiles_outside_0_to_100_are_refused() -> None:
    with pytest.raises(ValueError, match="percentiles"):
        compute_metrics([multi_token()], percentiles=(50, 101))
