"""Turn raw `RequestRecord`s into run metrics, once, from a table of definitions.

Keys and semantics follow vLLM's `vllm bench serve` result file
(`vllm/benchmarks/serve.py`: `calculate_metrics`, `BenchmarkMetrics`, the `result` dict
and `process_one_metric`; timestamps from `vllm/benchmarks/lib/endpoint_request_func.py`).
Per request, on successful non-warm-up records (times are perf_counter ns, one clock):

- TTFT  = first token-carrying message - sent.
- E2EL  = last token-carrying message - sent (vLLM's `latency`; a trailing usage-only
  message or `[DONE]` does not count, as in vLLM).
- TPOT  = (E2EL - TTFT) / (completion_tokens - 1), only when completion_tokens > 1.
- ITL   = gaps between consecutive token-carrying messages, pooled over all requests.

Where we differ or choose, and where AIPerf (`aiperf/metrics/types/*.py`) differs:

- ITL with multi-token messages: vLLM appends one gap per message, whatever the number
  of tokens in it. We split a gap g that ends in a k-token message into k values g/k,
  so every token after the first message has one ITL value and the pooled ITL mean is
  a per-token figure. The extra tokens of the *first* message get no ITL value (their
  wait is TTFT). With one token per message the two agree exactly.
- AIPerf's `inter_token_latency` is per request (E2E - TTFT) / (OSL - 1): vLLM's TPOT,
  our `tpot`. AIPerf's per-message gaps are `inter_chunk_latency`, averaged per request.
- AIPerf's `output_token_throughput_per_user` = 1 / its ITL = 1 / our TPOT: our
  `output_tok_s_per_user`. Requests with TPOT == 0 (all tokens in one message) have no
  value, as AIPerf refuses them.
- AIPerf's `request_latency` ends at the final response of any kind; ours ends at the
  last token-carrying message, as vLLM's does.
- Duration: vLLM times the whole run from just before the first send to after the last
  response (`duration`). By default we use AIPerf's `benchmark_duration`: first send to
  last receipt (last token message or `finished_ns`) over non-warm-up records; a caller
  may pass an explicit duration instead.
- Goodput (`request_goodput`, req/s): a request is good when it meets every bound given,
  inclusive, measured from send. A request with no TPOT (one output token) passes a
  TPOT bound, as in vLLM (which uses TPOT 0 there); AIPerf fails a request lacking a
  metric an SLO names. `request_goodput_scheduled` applies TTFT and E2EL bounds to the
  scheduled variants.
- No metric reports 0 when it has no data: vLLM writes `np.mean(x or 0)`; we write None.
- std is the population std (numpy's default, as vLLM); percentiles use numpy's default
  linear interpolation.

Our own additions (open loop, no coordinated omission): `ttft_scheduled` and
`e2el_scheduled` measure from `scheduled_ns`; `send_lag` = sent - scheduled, over every
non-warm-up record that has a schedule, failed ones included. When the emulator filled
in `modelled_*`, `modelled_ttft`, `modelled_tpot` and `modelled_e2el` sit beside the
measured ones; modelled TPOT = modelled_decode_s (else modelled E2E - TTFT) /
(completion_tokens - 1), since records carry no modelled TPOT of their own.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from memorywall.loadgen.records import RequestRecord
from memorywall.loadgen.slo import Slo, parse_slo

__all__ = [
    "DEFAULT_PERCENTILES",
    "METRICS",
    "Distribution",
    "MetricDef",
    "RunMetrics",
    "Scope",
    "Slo",
    "Unit",
    "compute_metrics",
    "parse_slo",
]

_NS_PER_S = 1e9
DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0)
NO_TOKENS_ERROR = "no token-carrying message received"


class Unit(enum.Enum):
    """Internal unit of a metric's values, and how the result file shows them."""

    SECONDS = ("s", "_ms", 1e3, "ms")
    TOKENS_PER_S = ("tok/s", "", 1.0, "tok/s")

    def __init__(self, si: str, key_suffix: str, to_display: float, display: str) -> None:
        self.si = si
        self.key_suffix = key_suffix  # fixed by vLLM's key names, e.g. `mean_ttft_ms`
        self.to_display = to_display
        self.display = display


class Scope(enum.Enum):
    COMPLETED = "successful non-warm-up records"
    SENT = "all non-warm-up records"


@dataclass(frozen=True, slots=True)
class _View:
    """What one record contributes, in SI units; None where it has no value."""

    ok: bool
    ttft_s: float | None = None
    e2el_s: float | None = None
    tpot_s: float | None = None
    ttft_scheduled_s: float | None = None
    e2el_scheduled_s: float | None = None
    send_lag_s: float | None = None
    tok_s_per_user: float | None = None
    modelled_ttft_s: float | None = None
    modelled_tpot_s: float | None = None
    modelled_e2el_s: float | None = None


@dataclass(frozen=True, slots=True)
class MetricDef:
    name: str  # key stem: `mean_<name>_ms`
    label: str
    unit: Unit
    formula: str
    scope: Scope
    view: str | None  # the `_View` field holding its value; None: ITL, pooled over every message
    optional: bool = False  # needs inputs not every run has; left out of tables when empty


_C, _S, _SEC, _TPS = Scope.COMPLETED, Scope.SENT, Unit.SECONDS, Unit.TOKENS_PER_S

METRICS: tuple[MetricDef, ...] = (
    MetricDef("ttft", "TTFT", _SEC, "first chunk - sent", _C, "ttft_s"),
    MetricDef("tpot", "TPOT", _SEC, "(e2el - ttft) / (completion_tokens - 1), if > 1 token", _C,
              "tpot_s"),
    MetricDef("itl", "ITL", _SEC, "chunk gap / k, k times for a k-token chunk; pooled", _C,
              None),
    MetricDef("e2el", "E2EL", _SEC, "last chunk - sent", _C, "e2el_s"),
    MetricDef("ttft_scheduled", "TTFT from schedule", _SEC, "first chunk - scheduled", _C,
              "ttft_scheduled_s", optional=True),
    MetricDef("e2el_scheduled", "E2EL from schedule", _SEC, "last chunk - scheduled", _C,
              "e2el_scheduled_s", optional=True),
    MetricDef("send_lag", "Send lag", _SEC, "sent - scheduled", _S, "send_lag_s",
              optional=True),
    MetricDef("output_tok_s_per_user", "Output tok/s per user", _TPS, "1 / tpot, if tpot > 0",
              _C, "tok_s_per_user"),
    MetricDef("modelled_ttft", "Modelled TTFT", _SEC, "modelled_ttft_s", _C,
              "modelled_ttft_s", optional=True),
    MetricDef("modelled_tpot", "Modelled TPOT", _SEC,
              "modelled_decode_s (or e2e - ttft) / (completion_tokens - 1)", _C,
              "modelled_tpot_s", optional=True),
    MetricDef("modelled_e2el", "Modelled E2EL", _SEC, "modelled_e2e_s", _C,
              "modelled_e2el_s", optional=True),
)  # fmt: skip


# --- Per-record views -------------------------------------------------------------------


def _pooled_itls_s(records: Sequence[RequestRecord]) -> np.ndarray:
    """Every record's ITL values, pooled, in one numpy pass over all their messages (a
    pass per record cost more than the rest of the metrics); raises if any record's
    message times go backwards."""
    lengths = np.fromiter((len(r.chunk_ns) for r in records), np.int64, len(records))
    if not lengths.size:
        return np.empty(0)
    flat: list[int] = []
    counted: list[int] = []
    for r in records:
        flat += r.chunk_ns
        # Without a token count per message, count one token per message (vLLM's view).
        counted += (
            r.chunk_tokens if len(r.chunk_tokens) == len(r.chunk_ns) else [1] * len(r.chunk_ns)
        )
    times = np.asarray(flat, dtype=np.int64)
    gaps = np.diff(times)
    firsts = np.cumsum(lengths)[:-1] - 1  # gap from one record's last message to the next's first
    keep = np.ones(gaps.size, dtype=bool)
    keep[firsts] = False
    if (gaps[keep] < 0).any():
        owner = np.repeat(np.arange(len(records)), lengths - 1)
        bad = records[int(owner[np.flatnonzero(gaps[keep] < 0)[0]])]
        raise ValueError(f"record {bad.index}: message times go backwards")
    counts = np.maximum(np.asarray(counted, dtype=np.int64)[1:][keep], 1)
    return np.repeat(gaps[keep] / counts / _NS_PER_S, counts)


def _view(r: RequestRecord) -> _View:
    lag = None if r.scheduled_ns is None else (r.sent_ns - r.scheduled_ns) / _NS_PER_S
    if not r.ok:
        return _View(ok=False, send_lag_s=lag)
    chunks = r.chunk_ns
    first, last = chunks[0], chunks[-1]
    if first < r.sent_ns:
        raise ValueError(f"record {r.index}: message times go backwards")
    ttft = (first - r.sent_ns) / _NS_PER_S
    e2el = (last - r.sent_ns) / _NS_PER_S
    n = r.completion_tokens
    tpot = (e2el - ttft) / (n - 1) if n > 1 else None
    m_tpot = None
    if n > 1:
        if r.modelled_decode_s is not None:
            m_tpot = r.modelled_decode_s / (n - 1)
        elif r.modelled_e2e_s is not None and r.modelled_ttft_s is not None:
            m_tpot = (r.modelled_e2e_s - r.modelled_ttft_s) / (n - 1)
    sched = r.scheduled_ns
    return _View(
        ok=True,
        ttft_s=ttft,
        e2el_s=e2el,
        tpot_s=tpot,
        ttft_scheduled_s=None if sched is None else (first - sched) / _NS_PER_S,
        e2el_scheduled_s=None if sched is None else (last - sched) / _NS_PER_S,
        send_lag_s=lag,
        tok_s_per_user=1.0 / tpot if tpot else None,
        modelled_ttft_s=r.modelled_ttft_s,
        modelled_tpot_s=m_tpot,
        modelled_e2el_s=r.modelled_e2e_s,
    )


# --- Results ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Distribution:
    """Statistics of one metric's values, in the metric's SI unit."""

    count: int
    mean: float
    median: float
    std: float
    percentiles: Mapping[float, float]

    @classmethod
    def of(cls, values: Sequence[float], percentiles: Sequence[float]) -> Distribution | None:
        if not len(values):
            return None
        a = np.asarray(values, dtype=np.float64)
        pct = np.percentile(a, list(percentiles)) if percentiles else []
        return cls(
            count=a.size,
            mean=float(np.mean(a)),
            median=float(np.median(a)),
            std=float(np.std(a)),
            percentiles={float(p): float(v) for p, v in zip(percentiles, pct, strict=True)},
        )


def _p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)  # vLLM: p99, p99.9


def _div(num: float, den: float | None) -> float | None:
    return None if den is None or den <= 0 else num / den


@dataclass(frozen=True, slots=True, kw_only=True)
class RunMetrics:
    duration_s: float | None
    completed: int
    failed: int
    warmup: int
    errors: Counter[str]
    total_input_tokens: int
    total_output_tokens: int
    good_requests: int | None
    good_requests_scheduled: int | None
    slo: Slo | None
    percentiles: tuple[float, ...]
    distributions: Mapping[str, Distribution | None] = field(default_factory=dict)

    @property
    def request_throughput(self) -> float | None:
        return _div(self.completed, self.duration_s)

    @property
    def output_throughput(self) -> float | None:
        return _div(self.total_output_tokens, self.duration_s)

    @property
    def total_token_throughput(self) -> float | None:
        return _div(self.total_input_tokens + self.total_output_tokens, self.duration_s)

    @property
    def request_goodput(self) -> float | None:
        return None if self.good_requests is None else _div(self.good_requests, self.duration_s)

    @property
    def request_goodput_scheduled(self) -> float | None:
        good = self.good_requests_scheduled
        return None if good is None else _div(good, self.duration_s)

    def as_dict(self) -> dict[str, object]:
        """Flat dict with vLLM's keys: latencies in ms, throughputs in tok/s or req/s."""
        out: dict[str, object] = {
            "duration": self.duration_s,
            "completed": self.completed,
            "failed": self.failed,
            "warmup_requests": self.warmup,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "request_goodput_scheduled": self.request_goodput_scheduled,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "error_counts": dict(self.errors.most_common()),
        }
        for m in METRICS:
            d = self.distributions.get(m.name)
            scale, suffix = m.unit.to_display, m.unit.key_suffix
            stats = {"mean": None, "median": None, "std": None}
            if d is not None:
                stats = {"mean": d.mean, "median": d.median, "std": d.std}
            for stat, v in stats.items():
                out[f"{stat}_{m.name}{suffix}"] = None if v is None else v * scale
            for p in self.percentiles:
                v = None if d is None else d.percentiles[p]
                out[f"p{_p_word(p)}_{m.name}{suffix}"] = None if v is None else v * scale
        return out

    def table_rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for a human summary; 'n/a' where there is no data."""

        def f(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.2f}"

        rows = [
            ("Successful requests", str(self.completed)),
            ("Failed requests", str(self.failed)),
            ("Warm-up requests (excluded)", str(self.warmup)),
            ("Benchmark duration (s)", f(self.duration_s)),
            ("Total input tokens", str(self.total_input_tokens)),
            ("Total generated tokens", str(self.total_output_tokens)),
            ("Request throughput (req/s)", f(self.request_throughput)),
            ("Output token throughput (tok/s)", f(self.output_throughput)),
            ("Total token throughput (tok/s)", f(self.total_token_throughput)),
        ]
        if self.slo is not None:
            rows.append(("Request goodput (req/s)", f(self.request_goodput)))
            rows.append(
                ("Request goodput from schedule (req/s)", f(self.request_goodput_scheduled))
            )
        for m in METRICS:
            d = self.distributions.get(m.name)
            if d is None and m.optional:
                continue  # needs inputs (a schedule, a modelled timeline) this run lacked
            s, u = m.unit.to_display, m.unit.display
            rows.append((f"Mean {m.label} ({u})", f(None if d is None else d.mean * s)))
            rows.append((f"Median {m.label} ({u})", f(None if d is None else d.median * s)))
            for p in self.percentiles:
                v = None if d is None else d.percentiles[p] * s
                rows.append((f"P{_p_word(p)} {m.label} ({u})", f(v)))
        for err, n in self.errors.most_common():
            rows.append((f"Error: {err.splitlines()[0][:60] if err else '(empty)'}", str(n)))
        return rows


def compute_metrics(
    records: Iterable[RequestRecord],
    *,
    duration_s: float | None = None,
    slo: Slo | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> RunMetrics:
    """Compute every metric in `METRICS` and the run totals in one pass over `records`.

    `duration_s` overrides the measured span (first send to last receipt).
    """
    pcts = tuple(float(p) for p in percentiles)
    values: dict[str, Sequence[float]] = {m.name: [] for m in METRICS}
    per_record = [(values[m.name], m.view, m.scope is Scope.SENT) for m in METRICS if m.view]
    ok: list[RequestRecord] = []
    errors: Counter[str] = Counter()
    completed = failed = warmup = total_in = total_out = 0
    good = good_sched = 0
    all_scheduled = True
    first_sent: int | None = None
    last_receipt: int | None = None
    for r in records:
        if r.warmup:
            warmup += 1
            continue
        first_sent = r.sent_ns if first_sent is None else min(first_sent, r.sent_ns)
        for t in (r.finished_ns, r.chunk_ns[-1] if r.chunk_ns else None):
            if t is not None and (last_receipt is None or t > last_receipt):
                last_receipt = t
        v = _view(r)
        for column, field_name, every_sent in per_record:
            if v.ok or every_sent:
                x = getattr(v, field_name)
                if x is not None:
                    column.append(x)
        if not v.ok:
            failed += 1
            errors[r.error if r.error is not None else NO_TOKENS_ERROR] += 1
            continue
        completed += 1
        ok.append(r)
        total_in += r.usage_prompt_tokens if r.usage_prompt_tokens is not None else r.prompt_tokens
        total_out += r.completion_tokens
        if slo is not None:
            assert v.ttft_s is not None and v.e2el_s is not None
            good += slo.met(ttft_s=v.ttft_s, tpot_s=v.tpot_s, e2el_s=v.e2el_s)
            if v.ttft_scheduled_s is None or v.e2el_scheduled_s is None:
                all_scheduled = False
            else:
                good_sched += slo.met(
                    ttft_s=v.ttft_scheduled_s, tpot_s=v.tpot_s, e2el_s=v.e2el_scheduled_s
                )
    values["itl"] = _pooled_itls_s(ok)
    if duration_s is None and first_sent is not None and last_receipt is not None:
        duration_s = (last_receipt - first_sent) / _NS_PER_S
    return RunMetrics(
        duration_s=duration_s,
        completed=completed,
        failed=failed,
        warmup=warmup,
        errors=errors,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        good_requests=None if slo is None else good,
        good_requests_scheduled=None if slo is None or not all_scheduled else good_sched,
        slo=slo,
        percentiles=pcts,
        distributions={m.name: Distribution.of(values[m.name], pcts) for m in METRICS},
    )
