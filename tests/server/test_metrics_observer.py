"""PrometheusMetrics as an engine observer: vLLM's series move by exactly what the engine did.

An AsyncEngine over the real core (llama-3.1-8b on wse-3) on a clock that jumps to
each deadline; every expectation comes from the `Finished` summaries the streams return.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable

import pytest
from engine_fakes import FakeClock
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from memorywall.core import Deployment, Speculative, StepModel, plan_deployment
from memorywall.server.engine.api import Finished, TokenGroup
from memorywall.server.engine.build import build_core
from memorywall.server.engine.live import AsyncEngine, RequestStream, step_report
from memorywall.server.engine.scheduler import (
    Emission,
    EngineConfig,
    EngineCore,
    FinishReason,
    ModelLimits,
    Request,
)
from memorywall.server.fronts.metrics import (
    ITL_BUCKETS_S,
    REQUEST_LATENCY_BUCKETS_S,
    TTFT_BUCKETS_S,
    PrometheusMetrics,
    build_1_2_5_buckets,
)

TIMEOUT_S = 10.0
MODEL = "served-llama"

REQUEST_HISTOGRAMS = (
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens",
)


class Scrape:
    """One `render()`, parsed back by prometheus_client's own parser."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        body, content_type = metrics.render()
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        self.families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        self.samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for f in self.families.values()
            for s in f.samples
        }

    def get(self, name: str, **labels: str) -> float:
        key = frozenset({"model_name": MODEL, "engine": "0", **labels}.items())
        return self.samples[(name, key)]

    def count(self, histogram: str) -> float:
        assert self.get(f"{histogram}_bucket", le="+Inf") == self.get(f"{histogram}_count")
        return self.get(f"{histogram}_count")

    def sum(self, histogram: str) -> float:
        return self.get(f"{histogram}_sum")


def request(rid: str, max_tokens: int, prompt_len: int = 100, **kw) -> Request:
    return Request(
        request_id=rid,
        prompt_ids=tuple(range(1, prompt_len + 1)),
        max_tokens=max_tokens,
        ignore_eos=kw.pop("ignore_eos", True),
        **kw,
    )


async def collect(stream: RequestStream) -> tuple[list[TokenGroup], Finished]:
    async def read():
        return [event async for event in stream]

    events = await asyncio.wait_for(read(), TIMEOUT_S)
    assert isinstance(events[-1], Finished)
    return events[:-1], events[-1]


def metrics_for(deployment: Deployment) -> PrometheusMetrics:
    return PrometheusMetrics.for_deployment(deployment, model_name=MODEL)


async def start(core: EngineCore, metrics: PrometheusMetrics) -> AsyncEngine:
    engine = AsyncEngine(core, clock=FakeClock(), max_messages_per_s=16_000, observers=[metrics])
    await engine.start()
    return engine


async def stop(engine: AsyncEngine) -> None:
    await asyncio.wait_for(engine.drain(0.0), TIMEOUT_S)
    await asyncio.wait_for(engine.stop(), TIMEOUT_S)


def assert_idle(scrape: Scrape, metrics: PrometheusMetrics) -> None:
    assert scrape.get("vllm:num_requests_running") == 0
    assert scrape.get("vllm:num_requests_waiting") == 0
    assert scrape.get("vllm:kv_cache_usage_perc") == 0
    assert scrape.get("memorywall:modelled_power_watts") == metrics.idle_power_w


def started(finished: Iterable[Finished]) -> list[Finished]:
    """The requests that got a first token: vLLM counts a prompt, and a TTFT, only then."""
    return [f for f in finished if f.completion_tokens > 0]


async def test_counters_and_histograms_move_by_exactly_the_load(wse3_8b):
    metrics = metrics_for(wse3_8b)
    engine = await start(build_core(wse3_8b, EngineConfig())[0], metrics)
    try:
        await collect(engine.submit(request("warm-up", max_tokens=8)))  # deltas, not absolutes
        before, stats_before = Scrape(metrics), engine.stats()

        streams = [
            engine.submit(request(f"len{i}", max_tokens=20 + i, prompt_len=50 + 10 * i))
            for i in range(4)
        ]
        nat = dict(max_tokens=64, ignore_eos=False, min_tokens=2)
        streams += [  # each its own seed, so their natural lengths differ
            engine.submit(request(f"nat{i}", sampling_seed=i, **nat)) for i in range(10)
        ]
        streams.append(engine.submit(request("queued", max_tokens=10)))
        assert engine.abort("queued")  # before any step: no token, no prompt counted
        long = engine.submit(request("long", max_tokens=20_000))
        results = [await collect(s) for s in streams]
        assert engine.abort("long")
        results.append(await collect(long))

        after, stats_after = Scrape(metrics), engine.stats()
    finally:
        await stop(engine)

    def delta(name: str, **labels: str) -> float:
        return after.get(name, **labels) - before.get(name, **labels)

    def count(histogram: str) -> float:
        return after.count(histogram) - before.count(histogram)

    def total(histogram: str) -> float:
        return after.sum(histogram) - before.sum(histogram)

    finished = [f for _, f in results]
    first = started(finished)
    reasons = Counter(f.reason for f in finished)
    assert reasons[FinishReason.ABORT] == 2
    assert reasons[FinishReason.STOP] >= 1 and reasons[FinishReason.LENGTH] >= 4

    for reason in FinishReason:
        success = delta("vllm:request_success_total", finished_reason=reason.value)
        assert success == reasons[reason]
    assert delta("vllm:prompt_tokens_total") == sum(f.prompt_tokens for f in first)
    assert delta("vllm:generation_tokens_total") == sum(f.completion_tokens for f in finished)
    assert delta("vllm:num_preemptions_total") == 0

    assert count("vllm:time_to_first_token_seconds") == len(first) == len(finished) - 1
    assert total("vllm:time_to_first_token_seconds") == pytest.approx(sum(f.ttft_s for f in first))
    # One inter-token latency per token after the first; together they span the decode.
    itl = "vllm:inter_token_latency_seconds"
    assert count(itl) == sum(f.completion_tokens - 1 for f in first)
    assert total(itl) == pytest.approx(sum(f.decode_s for f in first))
    tpot = "vllm:request_time_per_output_token_seconds"
    assert count(tpot) == sum(1 for f in finished if f.completion_tokens > 1)

    for histogram in REQUEST_HISTOGRAMS:
        assert count(histogram) == len(finished), histogram
    assert total("vllm:e2e_request_latency_seconds") == pytest.approx(
        sum(f.e2e_s for f in finished)
    )
    assert total("vllm:request_queue_time_seconds") == pytest.approx(
        sum(f.queue_s for f in finished)
    )
    assert total("vllm:request_prompt_tokens") == sum(f.prompt_tokens for f in finished)
    assert total("vllm:request_generation_tokens") == sum(f.completion_tokens for f in finished)

    steps = stats_after.steps - stats_before.steps
    assert count("vllm:iteration_tokens_total") == steps
    assert count("memorywall:step_time_seconds") == steps
    assert total("memorywall:step_time_seconds") > 0
    assert delta("memorywall:modelled_energy_joules_total") == pytest.approx(
        stats_after.modelled_energy_j - stats_before.modelled_energy_j
    )
    # One lag sample per token group handed to a stream.
    assert count("memorywall:emulation_lag_seconds") == sum(len(g) for g, _ in results)

    assert_idle(after, metrics)


async def test_every_series_carries_the_model_name_and_vllm_types(wse3_8b):
    metrics = metrics_for(wse3_8b)
    engine = await start(build_core(wse3_8b, EngineConfig())[0], metrics)
    try:
        await collect(engine.submit(request("r", max_tokens=16)))
    finally:
        await stop(engine)
    scrape = Scrape(metrics)
    types = {name: f.type for name, f in scrape.families.items()}
    assert types == {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:prefix_cache_queries": "counter",
        "vllm:prefix_cache_hits": "counter",
        "vllm:num_preemptions": "counter",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter",
        "memorywall:finished_requests_by_protocol": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:request_time_per_output_token_seconds": "histogram",
        "vllm:iteration_tokens_total": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:request_queue_time_seconds": "histogram",
        "vllm:request_inference_time_seconds": "histogram",
        "vllm:request_prefill_time_seconds": "histogram",
        "vllm:request_decode_time_seconds": "histogram",
        "vllm:request_prompt_tokens": "histogram",
        "vllm:request_generation_tokens": "histogram",
        "memorywall:emulation_lag_seconds": "histogram",
        "memorywall:step_time_seconds": "histogram",
        "memorywall:modelled_energy_joules": "counter",
        "memorywall:modelled_power_watts": "gauge",
        "memorywall:degraded": "gauge",
        "memorywall:host_stalls": "counter",
        "memorywall:host_stall_seconds": "counter",
        "memorywall:rated_power_watts": "gauge",
    }
    for (_, labels), _value in scrape.samples.items():
        labels = dict(labels)
        assert labels["model_name"] == MODEL
        assert labels["engine"] == "0"
    reasons = {
        dict(s.labels)["finished_reason"] for s in scrape.families["vllm:request_success"].samples
    }
    assert reasons == {"stop", "length", "abort"}
    assert scrape.get("vllm:request_success_total", finished_reason="length") == 1
    # Submitted straight to the engine, not through a front: no protocol named.
    by_protocol = "memorywall:finished_requests_by_protocol_total"
    assert scrape.get(by_protocol, protocol="unknown") == 1

    def bounds(histogram: str) -> list[float]:
        family = scrape.families[histogram]
        return [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]

    inf = float("inf")
    assert bounds("vllm:time_to_first_token_seconds") == [*TTFT_BUCKETS_S, inf]
    assert bounds("vllm:inter_token_latency_seconds") == [*ITL_BUCKETS_S, inf]
    assert bounds("vllm:e2e_request_latency_seconds") == [*REQUEST_LATENCY_BUCKETS_S, inf]
    context = wse3_8b.model.max_context
    assert bounds("vllm:request_prompt_tokens") == [*build_1_2_5_buckets(context), inf]
    rated_w = wse3_8b.hardware.tdp_w * wse3_8b.devices
    assert scrape.get("memorywall:rated_power_watts") == rated_w


def test_vllm_token_buckets_and_timing_buckets():
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert build_1_2_5_buckets(131_072)[-1] == 100_000
    assert TTFT_BUCKETS_S[0] == 0.001 and TTFT_BUCKETS_S[-1] == 2560.0
    assert ITL_BUCKETS_S[0] == 0.01 and ITL_BUCKETS_S[-1] == 80.0
    assert REQUEST_LATENCY_BUCKETS_S[0] == 0.3 and REQUEST_LATENCY_BUCKETS_S[-1] == 7680.0


async def test_gauges_follow_the_scheduler_and_clear_on_abort(wse3_8b):
    metrics = metrics_for(wse3_8b)
    engine = await start(build_core(wse3_8b, EngineConfig(max_num_seqs=2))[0], metrics)
    try:
        streams = [engine.submit(request(f"r{i}", max_tokens=20_000)) for i in range(3)]
        for s in streams[:2]:
            assert isinstance(await asyncio.wait_for(s.next_event(), TIMEOUT_S), TokenGroup)
        busy = Scrape(metrics)
        stats = engine.stats()
        for i in range(3):
            assert engine.abort(f"r{i}")
        idle = Scrape(metrics)  # aborted between steps: no step has run since
    finally:
        await stop(engine)

    assert busy.get("vllm:num_requests_running") == stats.running == 2
    assert busy.get("vllm:num_requests_waiting") == stats.waiting == 1
    assert busy.get("vllm:kv_cache_usage_perc") == stats.kv_used_tokens / stats.kv_total_tokens
    assert 0 < busy.get("vllm:kv_cache_usage_perc") < 1
    assert busy.get("memorywall:modelled_power_watts") > metrics.idle_power_w
    assert_idle(idle, metrics)
    assert idle.get("vllm:request_success_total", finished_reason="abort") == 3


async def test_preemptions_are_counted_and_prompts_counted_once(wse3_8b):
    config = EngineConfig(block_size=16)
    limits = ModelLimits(
        kv_capacity_tokens=96,  # 6 blocks: three 16-token prompts growing to 40 tokens cannot fit
        max_context=wse3_8b.model.max_context,
        vocab_size=wse3_8b.model.vocab_size,
        eos_token_ids=frozenset(wse3_8b.model.eos_token_ids),
    )
    core = EngineCore(StepModel(wse3_8b), limits, config)
    metrics = metrics_for(wse3_8b)
    engine = await start(core, metrics)
    try:
        streams = [engine.submit(request(f"r{i}", max_tokens=24, prompt_len=16)) for i in range(3)]
        finished = [(await collect(s))[1] for s in streams]
    finally:
        await stop(engine)
    scrape = Scrape(metrics)
    preemptions = sum(f.preemptions for f in finished)
    assert preemptions > 0
    assert scrape.get("vllm:num_preemptions_total") == preemptions == core.counters.preemptions
    assert scrape.get("vllm:prompt_tokens_total") == 3 * 16
    assert scrape.get("vllm:generation_tokens_total") == 3 * 24
    assert scrape.count("vllm:inter_token_latency_seconds") == 3 * 23


async def test_speculative_steps_observe_one_latency_per_token(wse3_8b):
    spec = plan_deployment(
        wse3_8b.hardware,
        wse3_8b.model,
        speculative=Speculative(draft_tokens=4, acceptance_rate=0.8),
    )
    metrics = metrics_for(spec)
    engine = await start(build_core(spec, EngineConfig())[0], metrics)
    try:
        _, final = await collect(engine.submit(request("r", max_tokens=400)))
    finally:
        await stop(engine)
    scrape = Scrape(metrics)
    steps = engine.stats().steps
    assert steps < final.completion_tokens  # several tokens per decode step
    assert scrape.count("vllm:inter_token_latency_seconds") == final.completion_tokens - 1
    assert scrape.sum("vllm:inter_token_latency_seconds") == pytest.approx(final.decode_s)
    assert scrape.get("vllm:generation_tokens_total") == final.completion_tokens == 400


def test_a_step_of_k_tokens_observes_its_gap_over_k_k_times(wse3_8b):
    core, _ = build_core(wse3_8b, EngineConfig())
    a, b, c = (core.add(request(r, max_tokens=10, prompt_len=7), 5.0) for r in "abc")
    step = core.schedule(5.0)
    assert step is not None
    metrics = metrics_for(wse3_8b)

    first = [Emission(s, [11], 5.004, False, None) for s in (a, b, c)]
    metrics.on_step(step_report(step, first, preemptions_total=0))
    # a: 3 tokens over 36 ms, b: 1 over 36 ms, c: 1 over 12 ms (a run of equal gaps, then two)
    later = [
        Emission(a, [12, 13, 14], 5.040, False, 5.004),
        Emission(c, [12], 5.040, False, 5.028),
        Emission(b, [12], 5.040, False, 5.004),
    ]
    report = step_report(step, later, preemptions_total=0)
    assert sum(n for _, n in report.token_gaps) == 5
    assert sum(g * n for g, n in report.token_gaps) == pytest.approx(0.036 + 0.012 + 0.036)
    metrics.on_step(report)
    scrape = Scrape(metrics)

    assert scrape.count("vllm:time_to_first_token_seconds") == 3
    assert scrape.sum("vllm:time_to_first_token_seconds") == pytest.approx(3 * 0.004)
    assert scrape.get("vllm:prompt_tokens_total") == 3 * 7
    assert scrape.get("vllm:generation_tokens_total") == 3 + 5
    itl = "vllm:inter_token_latency_seconds"
    assert scrape.count(itl) == 5
    assert scrape.sum(itl) == pytest.approx(3 * 0.012 + 0.012 + 0.036)
    assert scrape.get(f"{itl}_bucket", le="0.01") == 0
    assert scrape.get(f"{itl}_bucket", le="0.025") == 4  # a's three 12 ms tokens and c's
    assert scrape.get(f"{itl}_bucket", le="0.05") == 5  # b's 36 ms
    assert scrape.count("memorywall:step_time_seconds") == 2
    assert scrape.get("memorywall:modelled_energy_joules_total") == pytest.approx(
        2 * step.cost.energy_j
    )


async def test_two_observers_on_two_engines_share_nothing(wse3_8b):
    a, b = metrics_for(wse3_8b), metrics_for(wse3_8b)
    assert a.registry is not b.registry
    engine_a = await start(build_core(wse3_8b, EngineConfig())[0], a)
    engine_b = await start(build_core(wse3_8b, EngineConfig())[0], b)
    try:
        await collect(engine_a.submit(request("r", max_tokens=30)))
        streams = [engine_b.submit(request(f"r{i}", max_tokens=5)) for i in range(2)]
        for s in streams:
            await collect(s)
    finally:
        await stop(engine_a)
        await stop(engine_b)
    sa, sb = Scrape(a), Scrape(b)
    assert sa.get("vllm:generation_tokens_total") == 30
    assert sb.get("vllm:generation_tokens_total") == 10
    assert sa.get("vllm:request_success_total", finished_reason="length") == 1
    assert sb.get("vllm:request_success_total", finished_reason="length") == 2
    assert sa.count("vllm:e2e_request_latency_seconds") == 1
    assert sb.count("vllm:e2e_request_latency_seconds") == 2
    # Nothing lands in prometheus_client's process-wide registry.
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("vllm:")]
