"""The offline fast path (`decode_run`) leaves the engine exactly as stepping one at a time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from memorywall.core import Batch, StepModel, load_hardware, load_model, plan_deployment
from memorywall.server.engine.build import build_core
from memorywall.server.engine.offline import OfflineEngine
from memorywall.server.engine.scheduler import EngineConfig, EngineCore, ModelLimits, Request


@dataclass(frozen=True)
class _Cost:
    time_s: float
    energy_j: float


class RoundStepModel:
    """10 ms + 0.1 ms per token + 1 ns per cached token read; no vectorised form."""

    def step_cost(self, batch: Batch) -> _Cost:
        tokens = len(batch.decode_contexts) + sum(c.new_tokens for c in batch.prefill)
        read = sum(batch.decode_contexts) + sum(c.cached_tokens for c in batch.prefill)
        return _Cost(time_s=0.01 + 1e-4 * tokens + 1e-9 * read, energy_j=0.3 * tokens + 1e-7 * read)


def fake_core(config: EngineConfig, kv_tokens: int) -> EngineCore:
    limits = ModelLimits(
        kv_capacity_tokens=kv_tokens,
        max_context=8192,
        vocab_size=32_000,
        eos_token_ids=frozenset({0}),
    )
    return EngineCore(RoundStepModel(), limits, config)


def workload(seed: int) -> list[tuple[float, Request]]:
    """Mixed lengths, bursts of arrivals, shared prefixes, some natural (EOS) ends."""
    rng = np.random.default_rng(seed)
    prefixes = [tuple(int(x) for x in rng.integers(1, 32_000, 64)) for _ in range(3)]
    out, t = [], 0.0
    for i in range(int(rng.integers(5, 40))):
        t += float(rng.exponential(0.05)) if rng.random() < 0.7 else 0.0
        own = tuple(int(x) for x in rng.integers(1, 32_000, int(rng.integers(1, 200))))
        prompt = (prefixes[int(rng.integers(3))] if rng.random() < 0.5 else ()) + own
        request = Request(
            request_id=f"r{i}",
            prompt_ids=prompt,
            max_tokens=int(rng.integers(1, 300)),
            ignore_eos=bool(rng.random() < 0.7),
        )
        out.append((t, request))
    return out


def run(core: EngineCore, arrivals: list[tuple[float, Request]], fast: bool) -> dict:
    engine = OfflineEngine(core, fast=fast)
    for t, r in arrivals:
        engine.submit(r, t)
    engine.run()
    pool = core.kv.pool
    return {
        "timelines": {k: (v.group_times_s, v.group_tokens, v) for k, v in engine.timelines.items()},
        "outputs": {k: tuple(s.output_ids) for k, s in core.live.items()},
        "counters": core.counters,
        "pool": (pool.free_blocks, dict(pool.cached), list(pool.ref_counts), len(pool._lru)),
        "now": engine.now_s,
    }


CONFIGS = {
    "roomy": (EngineConfig(), 64 * 1024),
    "few-seqs": (EngineConfig(max_num_seqs=3), 64 * 1024),
    "small-kv": (EngineConfig(max_num_batched_tokens=256), 1024),
    "no-prefix-cache": (EngineConfig(enable_prefix_caching=False, block_size=8), 2048),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("seed", range(6))
def test_fast_path_matches_stepping(name: str, seed: int) -> None:
    config, kv = CONFIGS[name]
    arrivals = workload(seed)
    fast = run(fake_core(config, kv), arrivals, fast=True)
    slow = run(fake_core(config, kv), arrivals, fast=False)
    assert fast == slow


def test_fast_path_is_taken_and_matches_on_real_costs() -> None:
    """The core's vectorised `decode_run` agrees bit for bit with `step_cost`, step by step."""
    deployment = plan_deployment(load_hardware("wse-3"), load_model("llama-3.1-8b"))
    arrivals = workload(7)
    results, steps = [], []
    for fast in (True, False):
        core, _ = build_core(deployment, EngineConfig())
        calls = 0
        step_cost = core.step_model.step_cost

        def counting(batch: Batch, _inner=step_cost) -> object:
            nonlocal calls
            calls += 1
            return _inner(batch)

        core.step_model.step_cost = counting
        results.append(run(core, arrivals, fast=fast))
        steps.append((calls, core.counters.steps))
    assert results[0] == results[1]
    (fast_calls, fast_steps), (slow_calls, slow_steps) = steps
    assert fast_steps == slow_steps == slow_calls
    assert fast_calls < slow_calls / 3  # most decode steps were taken many at a time


def test_core_decode_run_equals_step_costs() -> None:
    rng = np.random.default_rng(0)
    for hardware, model in (("h100-sxm", "gpt-oss-120b"), ("wse-3", "llama-3.1-8b")):
        sm = StepModel(plan_deployment(load_hardware(hardware), load_model(model)))
        contexts = [int(c) for c in rng.integers(0, 150_000, 37)]
        times, energies = sm.decode_run(contexts, 20)
        for j in range(20):
            cost = sm.step_cost(Batch(decode_contexts=[c + j for c in contexts]))
            assert (cost.time_s, cost.energy_j) == (times[j], energies[j])


def twins(seed: int) -> list[tuple[float, Request]]:
    """Identical requests (same prompt, so the same output tokens) arriving apart: their
    decode blocks hash alike, so a run meets blocks that are cached already."""
    rng = np.random.default_rng(seed)
    prompt = tuple(int(x) for x in rng.integers(1, 32_000, 40))
    out = []
    for i in range(12):
        t = float(rng.uniform(0, 2.0))
        out.append(
            (t, Request(request_id=f"t{i}", prompt_ids=prompt, max_tokens=150, ignore_eos=True))
        )
    return sorted(out, key=lambda x: x[0])


@pytest.mark.parametrize("watched", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_fast_path_matches_stepping_with_repeated_blocks(seed: int, watched: bool) -> None:
    """Runs whose blocks are cached already, or watched by a KV-event subscriber, take their
    KV events one at a time; the state and the event stream still match stepping."""
    arrivals = twins(seed)
    got = []
    for fast in (True, False):
        core = fake_core(EngineConfig(max_num_batched_tokens=64), 4096)
        events: list = []
        if watched:
            core.kv.subscribe(events.append)
        got.append((run(core, arrivals, fast=fast), events))
    assert got[0] == got[1]
