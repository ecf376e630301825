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
from typing import Any

import numpy as np

from memorywall.loadgen.record_arrays import Messages, SentRecords
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
class _Views:
    """Every metric's values in SI units, in record order: per metric, the records that
    have a value (successful ones; every sent one for `send_lag_s`)."""

    ttft_s: np.ndarray
    tpot_s: np.ndarray
    itl_s: np.ndarray
    e2el_s: np.ndarray
    ttft_scheduled_s: np.ndarray
    e2el_scheduled_s: np.ndarray
    send_lag_s: np.ndarray
    tok_s_per_user: np.ndarray
    modelled_ttft_s: np.ndarray
    modelled_tpot_s: np.ndarray
    modelled_e2el_s: np.ndarray


@dataclass(frozen=True, slots=True)
class MetricDef:
    name: str  # key stem: `mean_<name>_ms`
    label: str
    unit: Unit
    formula: str
    scope: Scope
    view: str  # the `_Views` field holding its values
    optional: bool = False  # needs inputs not every run has; left out of tables when empty


_C, _S, _SEC, _TPS = Scope.COMPLETED, Scope.SENT, Unit.SECONDS, Unit.TOKENS_PER_S

METRICS: tuple[MetricDef, ...] = (
    MetricDef("ttft", "TTFT", _SEC, "first chunk - sent", _C, "ttft_s"),
    MetricDef("tpot", "TPOT", _SEC, "(e2el - ttft) / (completion_tokens - 1), if > 1 token", _C,
              "tpot_s"),
    MetricDef("itl", "ITL", _SEC, "chunk gap / k, k times for a k-token chunk; pooled", _C,
              "itl_s"),
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


def _itls_s(gaps_ns: np.ndarray, tokens: np.ndarray | None) -> np.ndarray:
    """A gap ending in a k-token message gives k values gap / k."""
    if tokens is None:  # one token a message: each gap whole
        return gaps_ns / _NS_PER_S
    counts = np.maximum(tokens, 1)
    return np.repeat(gaps_ns / counts / _NS_PER_S, counts)


def _views(sent: SentRecords, completion_tokens: np.ndarray) -> _Views:
    """Every metric's values over all records at once; raises if any successful record's
    message times go backwards."""
    ok = sent.ok
    messages = Messages.of(sent)
    index, sent_ns = sent.index[ok], sent.sent_ns[ok]
    first, last = messages.first_ns, messages.last_ns
    early = first < sent_ns
    if early.any():
        raise ValueError(f"record {index[np.argmax(early)]}: message times go backwards")
    itls = _itls_s(*messages.gaps_ns(index))
    ttft, e2el = (first - sent_ns) / _NS_PER_S, (last - sent_ns) / _NS_PER_S
    decoding = completion_tokens > 1
    tpot = (e2el - ttft)[decoding] / (completion_tokens[decoding] - 1)
    sched, lag = sent.scheduled_ns[ok], sent.scheduled_ns
    m_ttft, m_e2e, m_decode = (
        sent.modelled_ttft_s[ok],
        sent.modelled_e2e_s[ok],
        sent.modelled_decode_s[ok],
    )
    # Modelled TPOT: the modelled decode span, else modelled E2E - TTFT.
    m_span = np.where(m_decode.given, m_decode.value, m_e2e.value - m_ttft.value)
    m_tpot = decoding & (m_decode.given | (m_e2e.given & m_ttft.given))
    return _Views(
        ttft_s=ttft,
        tpot_s=tpot,
        itl_s=itls,
        e2el_s=e2el,
        ttft_scheduled_s=(first - sched.value)[sched.given] / _NS_PER_S,
        e2el_scheduled_s=(last - sched.value)[sched.given] / _NS_PER_S,
        send_lag_s=(sent.sent_ns - lag.value)[lag.given] / _NS_PER_S,
        tok_s_per_user=1.0 / tpot[tpot != 0],
        modelled_ttft_s=m_ttft.present(),
        modelled_tpot_s=m_span[m_tpot] / (completion_tokens[m_tpot] - 1),
        modelled_e2el_s=m_e2e.present(),
    )


# --- Results ---------------------------------------------------------------------------


def _median_ranks(n: int) -> list[int]:
    """The ranks np.median reads: the middle one, or the two either side of the middle."""
    return [n // 2] if n % 2 else [n // 2 - 1, n // 2]


def _median(ordered: np.ndarray) -> float:
    """np.median of values whose `_median_ranks` are in sorted place, by its arithmetic: the
    middle one, or the mean of two."""
    mid = ordered.size // 2
    return float(ordered[mid] if ordered.size % 2 else np.mean(ordered[mid - 1 : mid + 1]))


def _percentile_ranks(n: int, percentiles: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """For each percentile of n values, np.percentile's default (linear, Hyndman and Fan's
    7th): the rank below (n - 1) * p / 100 and the fraction of the way to the next."""
    if any(not 0 <= p <= 100 for p in percentiles):
        raise ValueError(f"percentiles must be in [0, 100]: {percentiles}")
    at = (n - 1) * (np.asarray(percentiles, dtype=np.float64) / 100)
    below = np.floor(at)
    return below.astype(np.intp), at - below


def _percentiles(ordered: np.ndarray, percentiles: Sequence[float]) -> list[float]:
    """np.percentile of values whose ranks it reads (`_percentile_ranks` and the next) are
    in sorted place, by its arithmetic: linear between the values either side, from the
    nearer one."""
    lo, gamma = _percentile_ranks(ordered.size, percentiles)
    a, b = ordered[lo], ordered[np.minimum(lo + 1, ordered.size - 1)]
    step = b - a
    return np.where(gamma >= 0.5, b - step * (1 - gamma), a + step * gamma).tolist()


def _in_place(a: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """A copy of `a` with the ranks the median and percentiles read in sorted place: one
    partition around those few ranks, several times cheaper than a sort of a run's pooled
    ITL values (the values at those ranks are the sorted array's, exactly)."""
    n = a.size
    lo, _ = _percentile_ranks(n, percentiles)
    ranks = {*_median_ranks(n), *lo.tolist(), *np.minimum(lo + 1, n - 1).tolist()}
    return np.partition(a, sorted(ranks))


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
        # One partition for the median and every percentile: np.median and np.percentile
        # each partition a copy, and a full sort cost several times more.
        ordered = _in_place(a, percentiles)
        pct = _percentiles(ordered, percentiles)
        return cls(
            count=a.size,
            mean=float(np.mean(a)),
            median=_median(ordered),
            std=float(np.std(a)),
            percentiles={float(p): v for p, v in zip(percentiles, pct, strict=True)},
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

    def as_dict(self) -> dict[str, Any]:
        """Flat dict with vLLM's keys: latencies in ms, throughputs in tok/s or req/s."""
        # Any: a JSON record whose value types differ by key (float, int, None, dicts).
        out: dict[str, Any] = {
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
            stats: dict[str, float | None] = {"mean": None, "median": None, "std": None}
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


def _goodput(slo: Slo, ttft_s: np.ndarray, tpot_s: list[float | None], e2el_s: np.ndarray) -> int:
    """Requests that meet `slo`, one `Slo.met` per request."""
    return sum(
        slo.met(ttft_s=a, tpot_s=b, e2el_s=c)
        for a, b, c in zip(ttft_s.tolist(), tpot_s, e2el_s.tolist(), strict=True)
    )


def compute_metrics(
    records: Iterable[RequestRecord],
    *,
    duration_s: float | None = None,
    slo: Slo | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> RunMetrics:
    """Compute every metric in `METRICS` and the run totals, over all `records` at once.

    `duration_s` overrides the measured span (first send to last receipt).
    """
    pcts = tuple(float(p) for p in percentiles)
    sent = SentRecords.of(records)
    completion_tokens = sent.completion_tokens()
    views = _views(sent, completion_tokens)
    errors = Counter(
        NO_TOKENS_ERROR if e is None else e
        for e, ok in zip(sent.error, sent.ok.tolist(), strict=True)
        if not ok
    )
    last_receipt = sent.last_receipt_ns()
    if duration_s is None and last_receipt is not None:
        duration_s = (last_receipt - int(sent.sent_ns.min())) / _NS_PER_S
    good = good_sched = None
    if slo is not None:
        # No TPOT (a single output token): None, which passes a TPOT bound.
        tpots = iter(views.tpot_s.tolist())
        tpot_s = [next(tpots) if d else None for d in (completion_tokens > 1).tolist()]
        good = _goodput(slo, views.ttft_s, tpot_s, views.e2el_s)
        if sent.scheduled_ns.given[sent.ok].all():
            good_sched = _goodput(slo, views.ttft_scheduled_s, tpot_s, views.e2el_scheduled_s)
    return RunMetrics(
        duration_s=duration_s,
        completed=views.ttft_s.size,
        failed=sent.index.size - views.ttft_s.size,
        warmup=sent.warmup,
        errors=errors,
        total_input_tokens=int(sent.prompt_tokens[sent.ok].sum()),
        total_output_tokens=int(completion_tokens.sum()),
        good_requests=good,
        good_requests_scheduled=good_sched,
        slo=slo,
        percentiles=pcts,
        distributions={m.name: Distribution.of(getattr(views, m.view), pcts) for m in METRICS},
    )
