"""Mooncake traces with hash ids, and multi-turn sessions (trace rows and the generator):
parsing, prompt building, release rules, and the prefix cache they reach in `simulate`
and live over gRPC and HTTP (loopback servers, small sizes)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from memorywall.loadgen import options
from memorywall.loadgen.bench import BenchConfig, Level, plan_level, prefix_figures
from memorywall.loadgen.cli import BenchError, workload_from_args
from memorywall.loadgen.prompts import PromptSource, carries_ids, spec_token_ids
from memorywall.loadgen.records import RequestRecord, RequestSpec
from memorywall.loadgen.runner import LoadPlan, split_plan
from memorywall.loadgen.sessions import (
    MultiTurnWorkload,
    chains,
    follow_ups,
    parse_multi_turn,
    prefix_hit_rate,
)
from memorywall.loadgen.workload import Fixed, SyntheticWorkload, TraceWorkload

# The target case. Request 1 repeats request 0's first three 512-token blocks (hash ids
# 0, 1, 2) and then has a block of its own (4): the engine's 16-token KV blocks tile a
# 512-token block exactly, so 1,536 / 16 = 96 of its KV blocks match request 0's, and
# the 97th differs from its first token. The 4th block is there because a prompt's last
# token is never served from cache: a request made of blocks 0, 1, 2 alone would find
# only 1,520 tokens cached (its last KV block recomputed). Request 2 shares nothing.
MOONCAKE = [
    {"timestamp": 0, "input_length": 2048, "output_length": 4, "hash_ids": [0, 1, 2, 3]},
    {"timestamp": 20, "input_length": 2048, "output_length": 4, "hash_ids": [0, 1, 2, 4]},
    {"timestamp": 40, "input_length": 1024, "output_length": 4, "hash_ids": [5, 6]},
]
EXPECTED_CACHED = [0, 1536, 0]


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    options.add_arguments(p)
    return p.parse_args(argv)


# ---- parsing --------------------------------------------------------------------------------


def test_mooncake_rows_keep_their_hash_ids(tmp_path):
    trace = TraceWorkload.from_jsonl(write_rows(tmp_path / "t.jsonl", MOONCAKE))
    specs = trace.specs(np.random.default_rng(0), 3)
    assert [s.hash_ids for s in specs] == [(0, 1, 2, 3), (0, 1, 2, 4), (5, 6)]
    assert {s.block_tokens for s in specs} == {512}
    assert [s.offset_s for s in specs] == [0.0, 0.02, 0.04]
    assert [s.prompt_tokens for s in specs] == [2048, 2048, 1024]
    assert trace.reports_prefix_hits


def test_trace_block_size_option(tmp_path):
    rows = [{"input_length": 2048, "output_length": 1, "hash_ids": [0, 1]}]
    path = write_rows(tmp_path / "t.jsonl", rows)
    workload, _ = workload_from_args(load_args(["--workload", path, "--trace-block-size", "1024"]))
    assert workload.block_tokens == 1024
    assert workload.specs(np.random.default_rng(0), 1)[0].block_tokens == 1024
    assert workload_from_args(load_args(["--workload", path]))[0].block_tokens == 512
    # Two blocks of 2,048 tokens are more than a 2,048-token prompt holds.
    with pytest.raises(BenchError, match=r"t.jsonl:1: hash_ids: 2 blocks of 2048 tokens"):
        workload_from_args(load_args(["--workload", path, "--trace-block-size", "2048"]))
    with pytest.raises(BenchError, match="--trace-block-size is for a JSONL trace"):
        workload_from_args(load_args(["--trace-block-size", "64"]))


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_trace_block_size_must_be_a_positive_integer(value, capsys):
    with pytest.raises(SystemExit) as exit:
        load_args(["--trace-block-size", value])
    assert exit.value.code == 2
    assert "--trace-block-size" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"input_length": 8, "output_length": 1, "hash_ids": [-1]}], "1: hash_ids: must be"),
        ([{"input_length": 8, "output_length": 1, "hash_ids": "0"}], "1: hash_ids: must be"),
        ([{"input_length": 8, "output_length": 1, "hash_ids": [0, 1]}], "2 blocks of 512"),
        ([{"input_length": 8, "output_length": 1, "delay": 5}], "1: delay: only a session"),
        ([{"input_length": 8, "output_length": 1, "session_id": 1.5}], "1: session_id: must"),
        (
            [{"input_length": 8, "output_length": 1, "session_id": "a", "delay": 1}],
            "1: delay: the first turn of session 'a'",
        ),
        (
            [
                {"input_length": 8, "output_length": 1, "session_id": "a"},
                {"input_length": 8, "output_length": 1, "session_id": "a", "delay": -1},
            ],
            "2: delay: must be a finite number",
        ),
        (
            [
                {"input_length": 8, "output_length": 1, "session_id": "a", "timestamp": 0},
                {"input_length": 8, "output_length": 1, "session_id": "a", "timestamp": 5},
            ],
            "2: timestamp: a session's later turn is sent by its delay",
        ),
        (
            [{"input_length": 8, "output_length": 1, "session_id": "a", "hash_ids": [0]}],
            "1: hash_ids: not supported on a session's turns",
        ),
    ],
)
def test_trace_faults_are_one_line_errors(tmp_path, rows, message):
    path = write_rows(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message) as e:
        TraceWorkload.from_jsonl(path)
    assert "\n" not in str(e.value)


def test_session_rows_carry_the_conversation(tmp_path):
    rows = [
        {"session_id": "x", "timestamp": 0, "input_length": 10, "output_length": 5},
        {"session_id": "y", "timestamp": 100, "input_length": 7, "output_length": 3},
        {"session_id": "x", "delay": 250, "input_length": 4, "output_length": 6},
        {"input_length": 9, "output_length": 2, "timestamp": 150},
        {"session_id": "x", "delay": 0, "input_length": 2, "output_length": 1},
    ]
    trace = TraceWorkload.from_jsonl(write_rows(tmp_path / "s.jsonl", rows))
    specs = trace.specs(np.random.default_rng(0), 5)
    assert [s.session for s in specs] == [0, 1, 0, None, 0]
    assert [s.turn for s in specs] == [0, 0, 1, 0, 2]
    assert [s.delay_s for s in specs] == [0.0, 0.0, 0.25, 0.0, 0.0]
    assert [s.offset_s for s in specs] == [0.0, 0.1, None, 0.15, None]
    assert specs[4].history == ((10, 5), (4, 6))
    assert [s.prompt_tokens for s in specs] == [10, 7, 10 + 5 + 4, 9, 10 + 5 + 4 + 6 + 2]
    assert [[s.index for s in c] for c in chains(specs)] == [[0, 2, 4], [1], [3]]
    assert {k: v.index for k, v in follow_ups(specs).items()} == {0: 2, 2: 4}


def test_multi_turn_generator_and_its_option():
    workload = parse_multi_turn("multi-turn:3:250", Fixed(100), Fixed(20))
    assert workload == MultiTurnWorkload(3, 0.25, Fixed(100), Fixed(20))
    assert str(workload) == "multi-turn:3:250"
    specs = workload.specs(np.random.default_rng(0), 7)  # sessions of 3, 3 and 1 turns
    turns = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    assert [(s.session, s.turn) for s in specs] == turns
    assert [s.prompt_tokens for s in specs[:3]] == [100, 220, 340]
    assert [s.delay_s for s in specs[:3]] == [0.0, 0.25, 0.25]
    config, _ = workload_from_args(
        load_args(["--workload", "multi-turn:3:250", "--input-len", "100", "--output-len", "20"])
    )
    assert config == workload
    for bad in ("multi-turn:0:10", "multi-turn:2:-1", "multi-turn:2", "multi-turn:x:1"):
        with pytest.raises(BenchError, match=f"bad workload '{bad}'"):
            workload_from_args(load_args(["--workload", bad]))


def test_multi_turn_lengths_same_seed_same_specs():
    from memorywall.loadgen.workload import Uniform

    workload = MultiTurnWorkload(4, 0.0, Uniform(100, 0.5), Uniform(30, 0.5))
    a = workload.specs(np.random.default_rng(3), 20)
    assert a == workload.specs(np.random.default_rng(3), 20)
    assert a != workload.specs(np.random.default_rng(4), 20)
    # The same draws, in the same order, as the synthetic workload's lengths.
    plain = SyntheticWorkload(Uniform(100, 0.5), Uniform(30, 0.5)).specs(
        np.random.default_rng(3), 20
    )
    assert [s.output_tokens for s in a] == [s.output_tokens for s in plain]


# ---- prompts --------------------------------------------------------------------------------


def test_equal_hash_ids_are_equal_token_blocks():
    a = RequestSpec(0, 2048, 4, hash_ids=(0, 1, 2, 3), block_tokens=512)
    b = RequestSpec(1, 1800, 4, hash_ids=(0, 1, 2, 4), block_tokens=512)
    c = RequestSpec(2, 600, 4, hash_ids=(1,), block_tokens=512)  # block 1 at another place
    ids = {s.index: spec_token_ids(s, 7) for s in (a, b, c)}
    assert [len(v) for v in ids.values()] == [2048, 1800, 600]
    assert ids[0][:1536] == ids[1][:1536]
    assert ids[0][1536] != ids[1][1536]
    assert ids[2][:512] == ids[0][512:1024]
    assert ids[2][512:] != ids[0][1024:1112]  # beyond its blocks: the request's own
    assert spec_token_ids(a, 8)[:512] != ids[0][:512]  # another salt, other blocks
    source = PromptSource(7)  # the simulator builds the same ids
    assert [list(source.token_ids(s)) for s in (a, b, c)] == list(ids.values())
    assert all(carries_ids(s) for s in (a, b, c))
    assert not carries_ids(RequestSpec(3, 10, 1))


def test_the_simulators_prompts_of_any_length_have_their_length():
    """Short prompts once used up the drawn offsets (IndexError after 1,024 of them); a
    prompt its group's prefix covers got every fresh draw left."""
    source = PromptSource(3)
    for i in range(3000):
        assert len(source.token_ids(RequestSpec(i, 1 + i % 40, 1))) == 1 + i % 40
    covered = RequestSpec(1, 64, 1, prefix_group=0, prefix_tokens=64)
    assert source.token_ids(covered) == tuple(spec_token_ids(covered, 3))


def test_the_simulators_prompt_ids_stay_what_they_were():
    """Same seed, same prompts: a digest of `PromptSource`'s ids over lengths from empty to
    past the corpus (wrapping), shorter than its fresh draws, and with group prefixes,
    pinned from the implementation that drew them first."""
    import hashlib

    lengths = [0, 1, 5, 31, 32, 33, 70_000, 140_000]
    lengths += np.random.default_rng(1).integers(0, 3000, size=5000).tolist()
    digest = hashlib.sha256()
    source = PromptSource(5)
    for i, n in enumerate(lengths):
        spec = RequestSpec(i, n, 1, prefix_group=i % 3 or None, prefix_tokens=i % 50)
        digest.update(repr(source.token_ids(spec)).encode())
    assert digest.hexdigest() == (
        "f5ce999337750620a8fd166814fee0f6e0d491dba2aab64adb5a83ca741d154d"
    )


def test_a_turn_begins_with_its_previous_turn_whole_prompt():
    specs = MultiTurnWorkload(3, 0.0, Fixed(50), Fixed(10)).specs(np.random.default_rng(0), 6)
    ids = [spec_token_ids(s, 1) for s in specs]
    assert [len(i) for i in ids] == [s.prompt_tokens for s in specs]
    assert ids[1][:50] == ids[0] and ids[2][:110] == ids[1]
    assert ids[3][:50] != ids[0][:50]  # another session
    assert [list(PromptSource(1).token_ids(s)) for s in specs] == ids


def test_chat_payload_sends_the_conversation_as_messages():
    from memorywall.loadgen.openai_target import OpenAITarget, hash_text

    target = OpenAITarget("http://x", chat=True, model="m", prompt_salt=3)
    spec = MultiTurnWorkload(3, 0.0, Fixed(5), Fixed(2)).specs(np.random.default_rng(0), 3)[2]
    messages = target.payload(spec)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2 + ["user"]
    assert [len(m["content"].split()) for m in messages] == [5, 2, 5, 2, 5]
    a = RequestSpec(0, 1000, 1, hash_ids=(9, 4), block_tokens=512)
    b = RequestSpec(1, 700, 1, hash_ids=(9,), block_tokens=512)
    assert hash_text(a, 3).split()[:512] == hash_text(b, 3).split()[:512]
    assert len(hash_text(b, 3).split()) == 700
    completions = OpenAITarget("http://x", chat=False, model="m", prompt_salt=3)
    assert completions.payload(a)["prompt"] == spec_token_ids(a, 3)


# ---- release rules and results ---------------------------------------------------------------


def test_workers_are_dealt_whole_sessions():
    specs = MultiTurnWorkload(3, 0.0, Fixed(5), Fixed(2)).specs(np.random.default_rng(0), 9)
    parts = split_plan(LoadPlan(specs=tuple(specs), concurrency=2), 2)
    assert [[s.session for s in p.specs] for p in parts] == [[0, 0, 0, 2, 2, 2], [1, 1, 1]]


def test_prefix_hit_rate_counts_measured_completed_requests():
    def record(cached, prompt, **kw):
        return RequestRecord(
            index=0,
            prompt_tokens=prompt,
            output_tokens=1,
            scheduled_ns=None,
            sent_ns=0,
            chunk_ns=[1],
            usage_prompt_tokens=prompt,
            usage_cached_tokens=cached,
            **kw,
        )

    records = [record(0, 100), record(64, 100), record(100, 100, warmup=True)]
    records.append(record(50, 100, error="boom"))
    assert prefix_hit_rate(records) == pytest.approx(64 / 200)
    assert prefix_hit_rate([record(None, 100)]) is None
    multi = BenchConfig(
        target="t", workload=MultiTurnWorkload(2, 0, Fixed(1), Fixed(1)), num_prompts=1
    )
    plain = BenchConfig(target="t", workload=SyntheticWorkload(Fixed(1), Fixed(1)), num_prompts=1)
    assert prefix_figures(multi, records) == {"prefix_hit_rate": pytest.approx(0.32)}
    assert prefix_figures(plain, records) == {}  # other workloads' results as they were


def test_session_turns_follow_their_previous_turn_in_simulate(wse3_8b):
    from memorywall.server.engine.scheduler import EngineConfig
    from memorywall.sim.simulate import simulate_level

    workload = MultiTurnWorkload(3, 0.05, Fixed(64), Fixed(8))
    config = BenchConfig(target="sim", workload=workload, num_prompts=6, seed=1)
    for level in (Level("c1", 1, None), Level("rate50", None, 50.0)):
        run = simulate_level(wse3_8b, EngineConfig(), config, level)
        by_index = {r.index: r for r in run.records}
        for spec in plan_level(config, level).specs:
            if spec.turn:
                previous = by_index[spec.index - 1]
                assert by_index[spec.index].sent_ns == previous.finished_ns + 50_000_000
        sessions_at = sorted(by_index[i].sent_ns for i in (0, 3))
        if level.concurrency == 1:  # one user: the second session after the first
            assert sessions_at[1] == by_index[2].finished_ns
        else:  # open loop: sessions start at their own offsets
            assert sessions_at[1] < by_index[2].finished_ns
        assert run.result["prefix_hit_rate"] > 0.4


# ---- the prefix cache, simulated and live -----------------------------------------------------


def test_mooncake_case_in_simulate(tmp_path, wse3_8b):
    from memorywall.server.engine.scheduler import EngineConfig
    from memorywall.sim.simulate import simulate_level

    trace = TraceWorkload.from_jsonl(write_rows(tmp_path / "t.jsonl", MOONCAKE))
    config = BenchConfig(target="sim", workload=trace, num_prompts=3, warmup=1)
    run = simulate_level(wse3_8b, EngineConfig(), config, Level("trace", None, None))
    measured = [r for r in run.records if not r.warmup]
    assert [r.usage_cached_tokens for r in measured] == EXPECTED_CACHED
    assert run.result["prefix_hit_rate"] == pytest.approx(1536 / 5120)


async def _run_live(deployment, plan: LoadPlan, backend) -> list[RequestRecord]:
    """`plan` against a fresh loopback server (gRPC, OpenAI completions or chat: the
    emulator's chat front reads a word as a token, so chat text caches as ids do)."""
    from memorywall.loadgen.runner import run_plan
    from memorywall.loadgen.target import Backend, TargetConfig, make_target
    from memorywall.server.app import EmulatorServer, ServerConfig
    from memorywall.server.engine.scheduler import EngineConfig

    server = EmulatorServer(deployment, EngineConfig(), ServerConfig(port=0, http_port=0))
    await server.start()
    try:
        address = server.target if backend is Backend.MEMORYWALL_GRPC else server.http_url
        config = TargetConfig(
            backend=backend, address=address, model=server.card.model, prompt_salt=11
        )
        target = make_target(config, timeout_s=30.0)
        try:
            result = await run_plan(target, plan)
        finally:
            await target.aclose()
    finally:
        await server.stop(grace_s=0.0)
    return sorted(result.records, key=lambda r: r.index)


@pytest.mark.parametrize("backend", ["memorywall-grpc", "openai-completions", "openai-chat"])
async def test_mooncake_case_live(tmp_path, wse3_8b, backend):
    from memorywall.loadgen.target import Backend

    trace = TraceWorkload.from_jsonl(write_rows(tmp_path / "t.jsonl", MOONCAKE))
    plan = LoadPlan(specs=tuple(trace.specs(np.random.default_rng(0), 3)), open_loop=True)
    records = await _run_live(wse3_8b, plan, Backend(backend))
    assert [r.error for r in records] == [None] * 3
    assert [r.usage_cached_tokens for r in records] == EXPECTED_CACHED


@pytest.mark.parametrize("backend", ["memorywall-grpc", "openai-completions", "openai-chat"])
async def test_multi_turn_hit_rate_live_matches_simulate(wse3_8b, backend):
    from memorywall.loadgen.target import Backend
    from memorywall.server.engine.scheduler import EngineConfig
    from memorywall.sim.simulate import simulate_level

    workload = MultiTurnWorkload(3, 0.02, Fixed(100), Fixed(12))
    config = BenchConfig(target="sim", workload=workload, num_prompts=12, seed=2)
    level = Level("c2", 2, None)
    simulated = simulate_level(wse3_8b, EngineConfig(), config, level).result["prefix_hit_rate"]
    records = await _run_live(wse3_8b, plan_level(config, level), Backend(backend))
    assert [r.error for r in records] == [None] * 12
    live = prefix_hit_rate(records)
    assert simulated > 0.4
    assert abs(live - simulated) <= 0.02


def _cli(*argv: str) -> tuple[int, str]:
    import contextlib
    import io

    from memorywall.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    return rc, err.getvalue()


SIM = ("simulate", "--hardware", "wse-3", "--model", "llama-3.1-8b")


def test_simulate_cli_writes_the_mooncake_case(tmp_path):
    path = write_rows(tmp_path / "t.jsonl", MOONCAKE)
    rc, err = _cli(*SIM, "--workload", path, "--out", str(tmp_path / "out"), "--no-plots")
    assert rc == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out/sim-trace.requests.jsonl").open()]
    assert [r["usage_cached_tokens"] for r in rows if not r["warmup"]] == EXPECTED_CACHED
    result = json.loads((tmp_path / "out/sim-trace.json").read_text())
    assert result["prefix_hit_rate"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trace-block-size", "0"], "--trace-block-size: must be >= 1"),
        (["--trace-block-size", "16"], "--trace-block-size is for a JSONL trace"),
        (["--workload", "multi-turn:2:x"], "bad workload 'multi-turn:2:x'"),
    ],
)
def test_wrong_options_exit_2_with_one_line(argv, message):
    for command in (SIM, ("bench",)):
        rc, err = _cli(*command, *argv)
        assert rc == 2
        assert message in err and len(err.strip().splitlines()) <= 2  # usage line + error


def test_same_seed_same_files(tmp_path):
    """A multi-turn sweep, open and closed loop, simulated twice: the same bytes."""
    argv = [*SIM, "--workload", "multi-turn:3:40", "--input-len", "uniform:80:0.5"]
    argv += ["--output-len", "uniform:10:0.5", "--num-prompts", "9", "--no-plots"]
    for load in (["--concurrency", "1,3"], ["--request-rate", "20", "--max-concurrency", "2"]):
        files = []
        for run in ("a", "b"):
            out = tmp_path / f"{load[0][2:]}-{run}"
            assert _cli(*argv, *load, "--out", str(out))[0] == 0
            files.append({p.name: p.read_bytes() for p in out.glob("sim-*")})
        # Per level: the result, the per-request rows and their message times (.tokens.npz).
        assert files[0] == files[1] and len(files[0]) == 3 * (len(load[1].split(",")))
