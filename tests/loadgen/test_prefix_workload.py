"""The shared-prefix workload: determinism, group interleaving, token-level prefix sharing."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from memorywall.loadgen.openai_target import OpenAITarget
from memorywall.loadgen.prefix_workload import SharedPrefixWorkload, parse_shared_prefix
from memorywall.loadgen.records import RequestSpec
from memorywall.loadgen.workload import Fixed, Uniform
from memorywall.server.fronts.tokenizer import ApproximateTokenizer


def specs(seed: int = 0, n: int = 40, groups: int = 4, prefix: int = 80) -> list[RequestSpec]:
    workload = SharedPrefixWorkload(groups, prefix, Uniform(100, 0.1), Fixed(16))
    return workload.specs(np.random.default_rng(seed), n)


def test_same_seed_same_specs_other_seed_other_order():
    assert specs(3) == specs(3)
    assert [s.prefix_group for s in specs(3)] != [s.prefix_group for s in specs(4)]


def test_groups_balanced_and_interleaved():
    out = specs(n=40, groups=4)
    groups = [s.prefix_group for s in out]
    assert Counter(groups) == {0: 10, 1: 10, 2: 10, 3: 10}
    assert groups != sorted(groups)  # shuffled, not one group after another
    assert len(set(groups[:8])) > 1
    assert all(s.prefix_tokens == 80 and s.prompt_tokens > 80 for s in out)
    assert [s.index for s in out] == list(range(40))


def test_prompt_raised_above_prefix():
    workload = SharedPrefixWorkload(2, 50, Fixed(10), Fixed(4))
    assert {s.prompt_tokens for s in workload.specs(np.random.default_rng(0), 6)} == {51}


def _words(target: OpenAITarget, spec: RequestSpec) -> list[str]:
    return target.payload(spec)["messages"][0]["content"].split(" ")


def test_chat_prompts_share_the_prefix_at_token_level():
    target = OpenAITarget("http://x", chat=True, model="m", prompt_salt=11)
    a, b, c = (
        RequestSpec(i, 100, 8, prefix_group=g, prefix_tokens=80) for i, g in enumerate((0, 0, 1))
    )
    wa, wb, wc = _words(target, a), _words(target, b), _words(target, c)
    assert len(wa) == len(wb) == len(wc) == 100  # one word per token
    assert wa[:80] == wb[:80] and wa[80:] != wb[80:]
    assert wa[:80] != wc[:80]
    # The emulator's tokenizer (four characters a token) sees the same shared prefix.
    tok = ApproximateTokenizer(128256)
    ta, tb, tc = (tok.encode(" ".join(w)) for w in (wa, wb, wc))
    assert ta[:80] == tb[:80] and ta != tb
    assert ta[:80] != tc[:80]


def test_completions_prompts_share_the_prefix():
    target = OpenAITarget("http://x", chat=False, model="m", prompt_salt=11)
    a = target.payload(RequestSpec(0, 100, 8, prefix_group=2, prefix_tokens=60))["prompt"]
    b = target.payload(RequestSpec(1, 100, 8, prefix_group=2, prefix_tokens=60))["prompt"]
    assert len(a) == len(b) == 100 and a[:60] == b[:60] and a[60:] != b[60:]


def test_specs_without_a_group_are_unchanged():
    target = OpenAITarget("http://x", chat=True, model="m", prompt_salt=11)
    assert len(_words(target, RequestSpec(0, 30, 8))) == 30


def test_parse():
    w = parse_shared_prefix("shared-prefix:8:800", Fixed(1000), Fixed(128))
    assert (w.groups, w.prefix_tokens, str(w)) == (8, 800, "shared-prefix:8:800")


@pytest.mark.parametrize(
    "text",
    ["shared-prefix:8", "shared-prefix:a:800", "shared-prefix:0:800", "shared-prefix:8:0", "x:1:2"],
)
def test_bad_text_is_one_line_value_error(text):
    with pytest.raises(ValueError, match="bad workload") as e:
        parse_shared_prefix(text, Fixed(10), Fixed(10))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("groups", "prefix"), [(0, 10), (2, 0), (2.5, 10), (True, 10), (2, -1)])
def test_bad_parameters(groups, prefix):
    with pytest.raises(ValueError, match="shared prefix") as e:
        SharedPrefixWorkload(groups, prefix, Fixed(10), Fixed(10))
    assert "\n" not in str(e.value)


def test_bad_n():
    with pytest.raises(ValueError, match="number of requests"):
        SharedPrefixWorkload(2, 10, Fixed(20), Fixed(4)).specs(np.random.default_rng(0), 0)


def test_bench_cli_flag():
    import argparse

    from memorywall.loadgen import options
    from memorywall.loadgen.cli import BenchError, config_from_args

    p = argparse.ArgumentParser()
    options.add_arguments(p)
    argv = ["--backend", "openai-chat", "--workload", "shared-prefix:4:400", "--input-len", "500"]
    config = config_from_args(p.parse_args(argv))
    assert config.workload == SharedPrefixWorkload(4, 400, Fixed(500), Fixed(128))
    assert config.num_prompts == 100
    with pytest.raises(BenchError, match="bad workload"):
        config_from_args(p.parse_args(["--workload", "shared-prefix:4:x"]))


async def test_grpc_and_http_hit_the_prefix_cache_alike_for_the_same_seed():
    """The same shared-prefix workload, over memorywall.v1 and over OpenAI completions,
    each against a fresh server: the same cached tokens, request by request."""
    from memorywall.core import load_hardware, load_model, plan_deployment
    from memorywall.loadgen.runner import LoadPlan, run_plan
    from memorywall.loadgen.target import Backend, TargetConfig, make_target
    from memorywall.server.app import EmulatorServer, ServerConfig
    from memorywall.server.engine.scheduler import EngineConfig

    wse3_8b = plan_deployment(load_hardware("wse-3"), load_model("llama-3.1-8b"))
    plan = LoadPlan(specs=tuple(specs(seed=5, n=12, groups=3, prefix=64)), concurrency=1)
    cached: dict[Backend, list[int]] = {}
    for backend in (Backend.MEMORYWALL_GRPC, Backend.OPENAI_COMPLETIONS):
        server = EmulatorServer(
            wse3_8b, EngineConfig(), ServerConfig(port=0, http_port=0, load_format="dummy")
        )
        await server.start()
        try:
            address = server.target if backend is Backend.MEMORYWALL_GRPC else server.http_url
            config = TargetConfig(
                backend=backend, address=address, model=server.card.model, prompt_salt=11
            )
            target = make_target(config, timeout_s=30.0)
            await target.connect()
            try:
                result = await run_plan(target, plan)
            finally:
                await target.aclose()
        finally:
            await server.stop(grace_s=0.0)
        records = sorted(result.records, key=lambda r: r.index)
        assert [r.error for r in records] == [None] * 12
        cached[backend] = [r.usage_cached_tokens for r in records]
    # One user: each group's first request misses, the other three hit the 64-token prefix.
    assert sorted(cached[Backend.MEMORYWALL_GRPC]) == [0] * 3 + [64] * 9
    assert cached[Backend.MEMORYWALL_GRPC] == cached[Backend.OPENAI_COMPLETIONS]
