"""`memorywall simulate`: bench's files from the engine on a virtual clock, deterministic,
released as the bench releases requests, and in step with a live server."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from memorywall.cli import main
from memorywall.core import load_hardware, load_model, plan_deployment
from memorywall.loadgen.bench import BenchConfig, Level
from memorywall.loadgen.metrics import compute_metrics
from memorywall.loadgen.prefix_workload import SharedPrefixWorkload
from memorywall.loadgen.records import RequestRecord, read_requests
from memorywall.loadgen.workload import (
    Fixed,
    LogNormal,
    SyntheticWorkload,
    TraceWorkload,
    Uniform,
)
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.sim.simulate import simulate_level

WSE = ["--hardware", "wse-3", "--model", "llama-3.1-8b"]
SMALL = ["--input-len", "64", "--output-len", "16"]


def simulate(tmp: Path, *argv: str) -> list[dict]:
    assert main(["simulate", *WSE, *argv, "--out", str(tmp)]) == 0
    return json.loads((tmp / "summary.json").read_text())


def test_writes_bench_files_marked_simulated(tmp_path: Path, capsys) -> None:
    argv = ["--concurrency", "1,4", "--num-prompts", "12", *SMALL, "--plots"]
    results = simulate(tmp_path, *argv)
    for name in ("sim-c1.json", "sim-c4.json", "sim-c1.requests.jsonl", "sim-c4.requests.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    for name in ("sim-c1.tokens.npz", "sim-c4.tokens.npz"):
        assert (tmp_path / name).stat().st_size > 0
    for name in ("latency_vs_load.png", "throughput_vs_interactivity.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    c1, c4 = results
    assert c1["simulated"] and c1["backend"] == "simulated"
    assert c1["date"] is None and c1["machine"] is None and c1["client_cpu_fraction"] is None
    assert (c1["completed"], c1["failed"], c1["warmup_requests"]) == (12, 0, 1)
    assert c1["total_output_tokens"] == 12 * 16
    # The client sees the modelled times (to the nanosecond the records keep).
    assert c1["mean_ttft_ms"] == pytest.approx(c1["mean_modelled_ttft_ms"], abs=2e-6)
    assert c1["mean_tpot_ms"] == pytest.approx(c1["predicted_tpot_ms"], rel=0.05)
    assert c4["mean_tpot_ms"] > c1["mean_tpot_ms"]
    wall = json.loads((tmp_path / "wall_time.json").read_text())
    assert [lv["level"] for lv in wall["levels"]] == ["c1", "c4"]
    assert all(lv["wall_s"] > 0 and lv["modelled_s"] > 0 for lv in wall["levels"])
    assert all(0 < lv["engine_s"] < lv["wall_s"] for lv in wall["levels"])
    assert all(0 < lv["engine_cpu_s"] < lv["cpu_s"] for lv in wall["levels"])
    # The whole command, from the process's start: more than its levels.
    command = wall["command"]
    assert command["wall_s"] > sum(lv["wall_s"] for lv in wall["levels"])
    assert command["cpu_s"] > 0 and command["wall_from_process_start"]
    assert command["modelled_s"] == sum(lv["modelled_s"] for lv in wall["levels"])
    out = capsys.readouterr().out
    assert "(simulated)" in out
    assert out.count("of host time for the level") == 2 and "s CPU, of which the engine's" in out
    assert out.count("whole command: ") == 1 and "since the process started" in out
    assert main(["bench", "compare", str(tmp_path)]) == 0


@pytest.mark.parametrize("flags", [[], ["--no-plots"]])
def test_no_plots_writes_the_rest_without_matplotlib(tmp_path: Path, flags: list[str]) -> None:
    """By default (and with `--no-plots`): the same result files, no PNGs, and matplotlib
    never imported (nor the gRPC client: a simulation has no server to reach; nor the
    other commands' modules, nor the split fleet's, which a plain run does not use, nor the
    bench runner's asyncio, process pools and TLS: a simulation sends nothing)."""
    unused = ("matplotlib", "grpc", "memorywall.plan", "memorywall.calibrate")
    unused += ("memorywall.server.pd", "memorywall.demo", "memorywall.cli.plan")
    unused += ("asyncio", "ssl", "concurrent.futures.process", "memorywall.loadgen.runner")
    code = (
        "import sys; from memorywall.cli import main; "
        f"main(['simulate', *{WSE!r}, '--num-prompts', '3', *{SMALL!r}, "
        f"'--out', {str(tmp_path)!r}, *{flags!r}]); "
        f"print(sorted({{m for m in sys.modules if m.startswith({unused!r})}}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "sim-c1.json",
        "sim-c1.requests.jsonl",
        "sim-c1.tokens.npz",
        "summary.json",
        "wall_time.json",
    ]


def test_same_seed_same_files_other_seed_other_numbers(tmp_path: Path) -> None:
    argv = ["--request-rate", "50", "--num-prompts", "30", "--input-len", "lognormal:200:0.5"]
    argv += ["--output-len", "uniform:20:0.5", "--slo", "ttft=5ms"]
    for run in ("a", "b"):
        simulate(tmp_path / run, *argv, "--seed", "3")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    names.remove("wall_time.json")
    assert names == [
        "sim-rate50.json",
        "sim-rate50.requests.jsonl",
        "sim-rate50.tokens.npz",
        "summary.json",
    ]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = simulate(tmp_path / "c", *argv, "--seed", "4")[0]
    assert (
        other["total_input_tokens"]
        != json.loads((tmp_path / "a/summary.json").read_text())[0]["total_input_tokens"]
    )


def test_token_times_each_form_reads_back_the_same_records(tmp_path: Path) -> None:
    """`--token-times`: npz (default), jsonl (bench's rows) and none; the first two read
    back as the same records, and the rest of the files do not change with it."""
    argv = ["--num-prompts", "6", "--input-len", "uniform:64:0.5", "--output-len", "8"]
    for form in BY_FORM:
        simulate(tmp_path / form, *argv, "--token-times", form)
    npz, inline, none = (read_requests(tmp_path / f / "sim-c1.requests.jsonl") for f in BY_FORM)
    assert [r.as_dict() for r in npz] == [r.as_dict() for r in inline]
    assert sum(len(r.chunk_ns) for r in npz) == 7 * 8 and isinstance(npz[0].chunk_ns, list)
    assert [r.as_dict(messages=False) for r in none] == [r.as_dict(messages=False) for r in npz]
    assert not (tmp_path / "none" / "sim-c1.tokens.npz").exists()
    for name in ("sim-c1.json", "summary.json"):
        assert len({(tmp_path / f / name).read_bytes() for f in BY_FORM}) == 1
    # Either form of rows replays as a trace (`--workload`), with the same arrivals.
    replays = [
        simulate(
            tmp_path / f"replay-{f}", "--workload", str(tmp_path / f / "sim-c1.requests.jsonl")
        )
        for f in ("npz", "jsonl")
    ]
    assert replays[0] == replays[1] and replays[0][0]["completed"] == 6


BY_FORM = ("npz", "jsonl", "none")


def test_jobs_simulate_levels_in_processes_with_the_same_files(tmp_path: Path) -> None:
    argv = ["--concurrency", "1,4,16", "--num-prompts", "12", *SMALL]
    one = simulate(tmp_path / "one", *argv)
    two = simulate(tmp_path / "two", *argv, "--jobs", "2")
    assert [r["level"] for r in two] == ["c1", "c4", "c16"]
    assert one == two
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    names.remove("wall_time.json")
    assert len(names) == 10  # 3 levels x (result, records, message times) + summary
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    wall = json.loads((tmp_path / "two" / "wall_time.json").read_text())
    assert [lv["level"] for lv in wall["levels"]] == ["c1", "c4", "c16"]


def deployment():
    return plan_deployment(load_hardware("wse-3"), load_model("llama-3.1-8b"))


def config(**kw) -> BenchConfig:
    values = {"target": "sim", "workload": SyntheticWorkload(Fixed(64), Fixed(32))}
    values.update(kw)
    return BenchConfig(**values)


def in_flight(records) -> int:
    """The most requests in flight at once (sent, not yet finished)."""
    events = sorted(
        [(r.sent_ns, 1) for r in records] + [(r.finished_ns, -1) for r in records],
        key=lambda e: (e[0], e[1]),  # a finish frees its slot before a send at that instant
    )
    most = now = 0
    for _, delta in events:
        now += delta
        most = max(most, now)
    return most


def test_closed_loop_sends_the_next_request_as_one_finishes() -> None:
    run = simulate_level(
        deployment(), EngineConfig(), config(num_prompts=20, warmup=2), Level("c3", 3, None)
    )
    records = [r for r in run.records if not r.warmup]
    warm = [r for r in run.records if r.warmup]
    assert warm[1].sent_ns == warm[0].finished_ns  # warm-ups one at a time, first
    assert min(r.sent_ns for r in records) == warm[1].finished_ns
    assert in_flight(records) == 3
    finishes = {r.finished_ns for r in run.records}
    assert all(r.sent_ns in finishes for r in records[3:])


def test_open_loop_cap_and_duration() -> None:
    cfg = config(num_prompts=40, request_rates=(400.0,), max_concurrency=2, warmup=0)
    run = simulate_level(deployment(), EngineConfig(), cfg, Level("rate400", 2, 400.0))
    assert in_flight(run.records) == 2
    assert all(r.sent_ns >= r.scheduled_ns for r in run.records)
    assert any(r.sent_ns > r.scheduled_ns for r in run.records)  # some waited for a slot
    cfg = config(num_prompts=40, duration_s=0.02, request_rates=(400.0,))
    short = simulate_level(deployment(), EngineConfig(), cfg, Level("rate400", None, 400.0))
    assert 0 < len(short.records) < 40
    assert all(r.scheduled_ns < 0.02e9 for r in short.records)


def test_records_hold_the_modelled_times_in_integer_ns() -> None:
    run = simulate_level(deployment(), EngineConfig(), config(num_prompts=3), Level("c2", 2, None))
    for r in run.records:
        row = json.loads(json.dumps(r.as_dict()))  # as the per-request JSONL holds it
        chunks = row["chunk_ns"]
        assert len(chunks) == 32 and chunks == sorted(chunks) and row["finished_ns"] == chunks[-1]
        assert chunks[0] - row["sent_ns"] == pytest.approx(r.modelled_ttft_s * 1e9, abs=1)
        assert chunks[-1] - chunks[0] == pytest.approx(r.modelled_decode_s * 1e9, abs=1)


@pytest.mark.parametrize(
    ("hardware", "prompt", "level"),
    [
        ("wse-3", Uniform(300, 0.9), Level("c16", 16, None)),
        ("h100-sxm", Uniform(100_000, 0.9), Level("c4", 4, None)),  # some past the context
    ],
)
def test_records_are_each_timelines_own_arithmetic(hardware, prompt, level) -> None:
    """`make_records` computes over all requests at once what each record's own
    arithmetic gives (round(s * 1e9), float differences), to the bit, refusals included."""
    from memorywall.server.engine.build import build_core
    from memorywall.server.engine.offline import OfflineEngine
    from memorywall.sim.simulate import _LevelDriver, make_records

    cfg = config(workload=SyntheticWorkload(prompt, Uniform(20, 0.9)), num_prompts=40)
    core, _ = build_core(plan_deployment(load_hardware(hardware), load_model("llama-3.1-8b")),
                         EngineConfig())  # fmt: skip
    engine = OfflineEngine(core)
    driver = _LevelDriver(cfg, level, engine)
    driver.start()
    engine.run()
    records, messages = make_records(driver.sent, driver.finished)
    by_id = {t.request_id: t for t in driver.finished}
    refused = 0
    sent = driver.sent
    assert list(sent.position.values()) == list(range(len(sent))) == list(range(len(records)))
    for request_id, i in sent.position.items():
        r, t = records[i], by_id[request_id]
        assert (r.index, r.sent_ns, r.warmup) == (
            sent.specs[i].index,
            round(sent.at_s[i] * 1e9),
            sent.warmup[i],
        )
        assert r.scheduled_ns == (
            None if sent.scheduled_s[i] is None else round(sent.scheduled_s[i] * 1e9)
        )
        if t.error is not None:
            refused += 1
            assert r.error and not len(r.chunk_ns) and r.finished_ns is None
            continue
        times = t.group_times_s
        assert list(r.chunk_ns) == [round(x * 1e9) for x in times] and r.finished_ns == round(
            times[-1] * 1e9
        )
        assert r.server_received_ns == round(t.arrival_s * 1e9)
        assert (
            r.modelled_ttft_s == times[0] - t.arrival_s
            and r.modelled_decode_s == times[-1] - times[0]
        )
        assert r.modelled_e2e_s == times[-1] - t.arrival_s and r.chunk_tokens is t.group_tokens
    assert (refused > 0) == (hardware == "h100-sxm")
    assert messages.ns.tolist() == [n for r in records for n in r.chunk_ns]
    assert messages.tokens.tolist() == [k for r in records for k in r.chunk_tokens]


def test_records_read_back_from_json_give_the_same_metrics() -> None:
    """The simulator's records (message times in one numpy array) and the same records as
    a client's lists, read back from the JSONL: the same metrics, to the last bit."""
    cfg = config(workload=SyntheticWorkload(Uniform(64, 0.5), Uniform(16, 0.9)), num_prompts=20)
    run = simulate_level(deployment(), EngineConfig(), cfg, Level("c4", 4, None))
    lists = [RequestRecord(**json.loads(json.dumps(r.as_dict()))) for r in run.records]
    assert isinstance(lists[0].chunk_ns, list)
    assert compute_metrics(lists).as_dict() == compute_metrics(run.records).as_dict()


def test_a_level_leaves_nothing_for_the_cycle_collector() -> None:
    """Reference counting frees a level's engine as it ends, in its own time."""
    gc.collect()
    gc.disable()
    try:
        simulate_level(deployment(), EngineConfig(), config(num_prompts=10), Level("c2", 2, None))
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_trace_arrivals_and_refused_requests(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    lines = [{"prompt_tokens": 32, "output_tokens": 8, "arrival_s": 0.1 * i} for i in range(5)]
    lines[2]["prompt_tokens"] = 200_000  # past the context window: the engine refuses it
    trace.write_text("\n".join(json.dumps(x) for x in lines))
    cfg = config(workload=TraceWorkload.from_jsonl(trace), num_prompts=5)
    run = simulate_level(deployment(), EngineConfig(), cfg, Level("trace", None, None))
    sent = [r.sent_ns for r in run.records if not r.warmup]
    assert sent == [round(0.1 * i * 1e9) for i in range(5)]
    assert run.result["failed"] == 1
    assert "ContextLengthError" in next(iter(run.result["error_counts"]))


def test_shared_prefix_hits_the_prefix_cache(tmp_path: Path) -> None:
    results = simulate(
        tmp_path, "--workload", "shared-prefix:2:256", "--input-len", "300", "--num-prompts", "10"
    )
    rows = [json.loads(line) for line in (tmp_path / "sim-c1.requests.jsonl").open()]
    cached = [r["usage_cached_tokens"] for r in rows if not r["warmup"]]
    # Each group's first request computes the group's 256 shared tokens (the warm-up has
    # no group); every later one finds them cached, 16 whole blocks.
    assert sorted(cached) == [0, 0] + [256] * 8
    assert results[0]["mean_ttft_ms"] < 1.0


BAD = {
    "no hardware": ["--model", "llama-3.1-8b"],
    "unknown hardware": ["--hardware", "h9000", "--model", "llama-3.1-8b"],
    "zero users": [*WSE, "--concurrency", "0"],
    "rate and users": [*WSE, "--concurrency", "2", "--request-rate", "4"],
    "bad length": [*WSE, "--input-len", "lots"],
    "bad slo": [*WSE, "--slo", "ttft=fast"],
    "negative seed": [*WSE, "--seed", "-1"],
    "missing trace": [*WSE, "--workload", "/nonexistent/trace.jsonl"],
    "bad prefix": [*WSE, "--workload", "shared-prefix:0:10"],
    "negative warmup": [*WSE, "--warmup", "-1"],
    "zero seqs": [*WSE, "--max-num-seqs", "0"],
    "bad precision": [*WSE, "--weight-precision", "fp3"],
    "bench-only flag": [*WSE, "--target", "127.0.0.1:1"],
    "zero jobs": [*WSE, "--jobs", "0"],
    "unknown token times": [*WSE, "--token-times", "csv"],
}


@pytest.mark.parametrize("argv", BAD.values(), ids=BAD.keys())
def test_bad_flags_are_one_line_errors_with_exit_2(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "memorywall", "simulate", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("memorywall: error: ")
    assert proc.stderr.count("\n") == 1, proc.stderr


SHAPES = {
    "open loop, capped, shared prefixes": dict(
        workload=SharedPrefixWorkload(3, 128, Uniform(600, 0.5), Uniform(60, 0.9)),
        request_rates=(2000.0,),
        max_concurrency=120,
        num_prompts=300,
    ),
    "closed loop, natural ends": dict(
        workload=SyntheticWorkload(LogNormal(400, 0.8), Uniform(80, 0.9)), num_prompts=300
    ),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_fast_path_gives_the_same_files_as_stepping(shape: str) -> None:
    """End to end through the load generator's rules, with KV pressure: 120 users on a
    deployment with ~53k tokens of KV preempt."""
    kw = SHAPES[shape]
    level = Level("x", 120, kw.get("request_rates", (None,))[0])
    tight = plan_deployment(load_hardware("wse-3"), load_model("llama-3.1-70b"))
    engine = EngineConfig(max_num_batched_tokens=4096)
    fast = simulate_level(tight, engine, config(**kw), level, fast=True)
    slow = simulate_level(tight, engine, config(**kw), level, fast=False)
    assert fast.result == slow.result
    assert [r.as_dict() for r in fast.records] == [r.as_dict() for r in slow.records]
    assert fast.steps == slow.steps
    assert fast.preemptions == slow.preemptions > 0
