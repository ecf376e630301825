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
