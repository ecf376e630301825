"""Prometheus metrics under vLLM's names, fed by the engine's observer hooks.

Names, types, label names, help strings and buckets follow vLLM v1's
`PrometheusStatLogger` (`vllm/v1/metrics/loggers.py`), so vLLM dashboards and
alerts read an emulated server unchanged; every series carries vLLM's labels
`model_name` and `engine` (always "0": one engine core). The emulator's own
series live under `memorywall:`.

Every time is the engine's modelled time, what the emulated hardware would
show, never the host's clock; `memorywall:emulation_lag_seconds` is the gap
between the two, and `memorywall:degraded` says the host is falling behind
(`memorywall:host_stall_seconds` counts the modelled time it cost).

`on_step` runs after every engine step (every ~0.5 ms on a wafer), so it only
adds to plain numbers: prometheus_client's metric objects take a lock per
update. The families are built when scraped, by `collect`. The hooks run on
the engine's event loop; call `render` there too so a scrape sees one state.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from memorywall.server.engine.api import EngineStats, Finished, FinishReason, StepReport
from memorywall.server.telemetry_labels import ENGINE_INDEX, LABEL_NAMES

if TYPE_CHECKING:
    from memorywall.core import Deployment

# The classic text format `generate_latest` writes, labelled as prometheus_client's
# own handler labels it by default (`choose_encoder`); spelled out because the
# library's CONTENT_TYPE_LATEST changed value (0.0.4, now 1.0.0) across releases.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets, copied so that histograms from vLLM and from the emulator
# aggregate (`sum by (le)`) into one quantile.
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

# The emulator's own: 0.1 ms (a wafer's step) up to seconds (a long prefill on a GPU).
LAG_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
STEP_TIME_BUCKETS_S = (*LAG_BUCKETS_S, 2.5, 5.0, 10.0)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` inclusive (vLLM's token-count buckets)."""
    buckets: list[int] = []
    scale = 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return tuple(buckets)
            buckets.append(mantissa * scale)
        scale *= 10


class _Histogram:
    """Bucket counts and a sum in plain Python numbers; a family only when scraped."""

    __slots__ = ("bounds", "counts", "documentation", "les", "name", "sum")

    def __init__(self, name: str, documentation: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(bounds)
        self.les = [floatToGoString(b) for b in self.bounds]  # the `le` label values
        self.counts = [0] * (len(self.bounds) + 1)  # the last is (largest bound, +Inf)
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        """`n` observations of `value` (a bound is inclusive: `le`)."""
        self.counts[bisect_left(self.bounds, value)] += n
        self.sum += value * n

    def family(self, labels: list[str]) -> HistogramMetricFamily:
        buckets = []
        total = 0
        for le, count in zip(self.les, self.counts, strict=False):
            total += count
            buckets.append((le, total))
        buckets.append(("+Inf", total + self.counts[-1]))
        family = HistogramMetricFamily(self.name, self.documentation, labels=LABEL_NAMES)
        family.add_metric(labels, buckets, self.sum)
        return family


class PrometheusMetrics:
    """An `EngineObserver` that keeps vLLM's Prometheus metrics in its own registry.

    Per step: token counters, TTFT when a sequence's first token lands, one
    inter-token latency per token, tokens per step, step time and energy.
    Per finished request (aborts included): success by reason, a count by the
    protocol of the front it came in on, and the request histograms. Scheduler
    gauges (running, waiting, KV usage) and the prefix cache counters (tokens
    looked up and found at admission; 0 with caching off) are read from the
    engine's stats (`watch`) when scraped, so they are current even after an abort
    between steps. Several instances never share state.
    """

    def __init__(
        self, *, model_name: str, max_model_len: int, idle_power_w: float, rated_power_w: float
    ) -> None:
        """`idle_power_w`: what the modelled hardware draws with no step running (the
        core's static power over all devices); `rated_power_w`: its TDP over all devices."""
        self.model_name = model_name
        self.idle_power_w = idle_power_w
        self.rated_power_w = rated_power_w
        self._labels = [model_name, ENGINE_INDEX]
        self._stats: Callable[[], EngineStats] | None = None

        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._preemptions = 0
        self._success = {reason: 0 for reason in FinishReason}
        self._by_protocol: dict[str, int] = {}  # finished requests by the front's protocol
        self._energy_j = 0.0
        self._last_step_power_w: float | None = None

        token_buckets = build_1_2_5_buckets(max_model_len)
        h = _Histogram
        self._ttft = h(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS_S,
        )
        self._itl = h(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS_S,
        )
        self._tpot = h(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS_S,
        )
        self._iteration_tokens = h(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS,
        )
        self._e2e = h(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self._queue = h(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self._inference = h(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self._prefill = h(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self._decode = h(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self._request_prompt = h(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            token_buckets,
        )
        self._request_generation = h(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            token_buckets,
        )
        self._lag = h(
            "memorywall:emulation_lag_seconds",
            "Wall-clock time a token group reached its stream after its modelled time.",
            LAG_BUCKETS_S,
        )
        self._step_time = h(
            "memorywall:step_time_seconds",
            "Modelled time of each engine step.",
            STEP_TIME_BUCKETS_S,
        )
        self._histograms = (
            self._ttft,
            self._itl,
            self._tpot,
            self._iteration_tokens,
            self._e2e,
            self._queue,
            self._inference,
            self._prefill,
            self._decode,
            self._request_prompt,
            self._request_generation,
            self._lag,
            self._step_time,
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def watch(self, stats: Callable[[], EngineStats]) -> None:
        """Read the gauges (running, waiting, KV, prefix cache) from `stats` when scraped."""
        self._stats = stats

    @classmethod
    def for_deployment(
        cls, deployment: Deployment, *, model_name: str | None = None
    ) -> PrometheusMetrics:
        """Static facts from the deployment; `model_name` is the served name (default: the
        model's)."""
        hw = deployment.hardware
        return cls(
            model_name=model_name or deployment.model.name,
            max_model_len=deployment.model.max_context,
            idle_power_w=hw.static_w * deployment.devices,
            rated_power_w=hw.tdp_w * deployment.devices,
        )

    # EngineObserver

    def on_step(self, step: StepReport) -> None:
        """Counters and per-token histograms for one step.

        vLLM counts a request's prompt when its first token is sampled, observes
        TTFT then, and observes one inter-token latency per step that gives a
        request tokens. Here a step that gives k tokens at once (accepted
        speculative drafts) observes its gap / k for each of the k tokens, so
        the ITL count is the decode tokens and its sum is the decode time.
        `vllm:iteration_tokens_total` observes the tokens the step ran through
        the model (prefill chunks plus decode queries, drafts included). vLLM
        observes the prompts whose prefill completed plus the tokens generated;
        the two agree on plain decode steps, and this one stays within
        `max_num_batched_tokens` under chunked prefill.
        """
        self._energy_j += step.energy_j
        self._step_time.observe(step.time_s)
        if step.time_s > 0:
            self._last_step_power_w = step.energy_j / step.time_s
        self._iteration_tokens.observe(step.tokens)
        self._preemptions = step.preemptions_total  # preemptions happen in scheduling
        for prompt_tokens, ttft_s in step.first_tokens:
            self._prompt_tokens += prompt_tokens
            self._ttft.observe(ttft_s)
        for gap_s, tokens in step.token_gaps:
            self._itl.observe(gap_s, tokens)
        self._generation_tokens += step.generated

    def on_finish(self, finished: Finished) -> None:
        """Request success by reason and the per-request histograms, in the model's own time:
        host stalls are taken out (those before the first token from the queue time first,
        where an idle engine's late start lands, then from the prefill)."""
        f = finished
        self._success[f.reason] += 1
        protocol = f.protocol or "unknown"
        self._by_protocol[protocol] = self._by_protocol.get(protocol, 0) + 1
        before_first = f.host_stall_s - f.decode_host_stall_s
        queue = max(f.queue_s - before_first, 0.0)
        prefill = f.prefill_s - (before_first - (f.queue_s - queue))
        decode = f.decode_s - f.decode_host_stall_s
        self._e2e.observe(f.e2e_s - f.host_stall_s)
        self._queue.observe(queue)
        self._prefill.observe(prefill)
        self._decode.observe(decode)
        self._inference.observe(prefill + decode)
        self._request_prompt.observe(f.prompt_tokens)
        self._request_generation.observe(f.completion_tokens)
        if f.completion_tokens > 1:  # vLLM records 0 s here; no data is not 0 s
            self._tpot.observe(decode / (f.completion_tokens - 1))

    def on_lag(self, lag_s: float) -> None:
        self._lag.observe(lag_s)

    # Exposition

    def collect(self) -> Iterator[Metric]:
        """The families as of now (prometheus_client's Collector protocol)."""
        labels = self._labels
        running = waiting = 0
        kv_usage = 0.0
        cache_queries = cache_hits = 0
        power_w = self.idle_power_w
        degraded, stalls, stalled_s = False, 0, 0.0
        if self._stats is not None:
            s = self._stats()
            running, waiting, kv_usage = s.running, s.waiting, s.kv_usage
            cache_queries, cache_hits = s.prefix_cache.queries, s.prefix_cache.hits
            stall = s.host_stall
            degraded, stalls, stalled_s = stall.degraded, stall.stalls, stall.stalled_s
            if s.busy and self._last_step_power_w is not None:
                power_w = self._last_step_power_w

        yield _gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels,
            running,
        )
        yield _gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels,
            waiting,
        )
        yield _gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            labels,
            kv_usage,
        )
        yield _counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            labels,
            cache_queries,
        )
        yield _counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            labels,
            cache_hits,
        )
        yield _counter(
            "vllm:num_preemptions",
            "Cumulative number of preemption from the engine.",
            labels,
            self._preemptions,
        )
        yield _counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", labels, self._prompt_tokens
        )
        yield _counter(
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            labels,
            self._generation_tokens,
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*LABEL_NAMES, "finished_reason"],
        )
        for reason, count in self._success.items():
            success.add_metric([*labels, reason.value], count)
        yield success
        by_protocol = CounterMetricFamily(
            "memorywall:finished_requests_by_protocol",
            "Finished requests (aborts included) by the wire protocol a front received them on "
            "(unknown: submitted with none named).",
            labels=[*LABEL_NAMES, "protocol"],
        )
        for protocol, count in sorted(self._by_protocol.items()):
            by_protocol.add_metric([*labels, protocol], count)
        yield by_protocol
        for histogram in self._histograms:
            yield histogram.family(labels)
        yield _counter(
            "memorywall:modelled_energy_joules",
            "Energy the modelled hardware spent on engine steps, in joules.",
            labels,
            self._energy_j,
        )
        yield _gauge(
            "memorywall:modelled_power_watts",
            "Modelled power: the last step's energy over its time while the engine has work, "
            "the hardware's static power when idle.",
            labels,
            power_w,
        )
        yield _gauge(
            "memorywall:degraded",
            "1 while the host is falling behind the modelled timeline (a stall in the last "
            "few seconds): tokens then come slower than the model, never faster.",
            labels,
            float(degraded),
        )
        yield _counter(
            "memorywall:host_stalls",
            "Times the engine woke past a modelled deadline and moved its timeline later.",
            labels,
            stalls,
        )
        yield _counter(
            "memorywall:host_stall_seconds",
            "Modelled time added by host stalls, in total.",
            labels,
            stalled_s,
        )
        yield _gauge(
            "memorywall:rated_power_watts",
            "Thermal design power of the modelled devices, all together.",
            labels,
            self.rated_power_w,
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its Content-Type, for a `/metrics` handler."""
        return generate_latest(self.registry), CONTENT_TYPE


def _gauge(name: str, documentation: str, labels: list[str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=LABEL_NAMES)
    family.add_metric(labels, value)
    return family


def _counter(name: str, documentation: str, labels: list[str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=LABEL_NAMES)
    family.add_metric(labels, value)
    return family
