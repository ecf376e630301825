"""`memorywall calibrate`: recovers known constants from data the emulator made with a known
profile, bounds the error on noisy data, refuses data that cannot identify a constant, and
writes a profile that `predict` and `serve` load at once."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from memorywall.calibrate.fit import calibrate
from memorywall.cli import main
from memorywall.core import (
    Batch,
    PrefillChunk,
    StepModel,
    load_hardware,
    load_model,
    plan_deployment,
)
from memorywall.ready import wait_for
from memorywall.server.engine.scheduler import EngineConfig

TRUE = {"weight_read": 0.8, "kv_read": 0.6, "compute": 0.7}
STEPS = [  # (batch, context, new_tokens)
    (1, 512, 0),
    (8, 1024, 0),
    (32, 2048, 0),
    (64, 1024, 0),
    (16, 4096, 0),
    (0, 0, 1024),
    (0, 0, 4096),
    (4, 1024, 512),
    (128, 512, 0),
]


@cache
def true_deployment():
    hw = load_hardware("h100-sxm")
    hw = dataclasses.replace(hw, efficiency=dataclasses.replace(hw.efficiency, **TRUE))
    return plan_deployment(hw, load_model("llama-3.1-8b"))


def base_deployment():
    return plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-8b"))


def write_steps(path: Path, rows, noise: np.ndarray | None = None, deployment=None) -> Path:
    """Step times of `rows` on `deployment` (the true one by default), times (1 + noise)."""
    sm = StepModel(deployment or true_deployment())
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["batch", "context", "new_tokens", "seconds"])
        for i, (b, c, n) in enumerate(rows):
            prefill = (PrefillChunk(n, cached_tokens=c),) if n else ()
            s = sm.step_cost(Batch(decode_contexts=(c,) * b, prefill=prefill)).time_s
            w.writerow([b, c, n, s * (1 + noise[i]) if noise is not None else s])
    return path


def fitted(result) -> dict[str, float]:
    return {k: getattr(result.efficiency, k) for k in TRUE}


def test_recovers_known_constants_from_step_times(tmp_path):
    result = calibrate([write_steps(tmp_path / "s.csv", STEPS)], base_deployment(), EngineConfig())
    for k, v in fitted(result).items():
        assert v == pytest.approx(TRUE[k], rel=0.01), k
    assert any(r.observation.held_out for r in result.rows)
    for r in result.rows:  # held out too: the same physics generated them
        assert r.after_s == pytest.approx(r.observation.measured_s, rel=0.01)


def replayed_results(concurrencies=(1, 8)) -> dict[int, dict]:
    """Bench result dicts of closed-loop levels (256/32) replayed on the true deployment."""
    from memorywall.loadgen.bench import BenchConfig, Level
    from memorywall.loadgen.workload import Fixed, SyntheticWorkload
    from memorywall.sim.simulate import simulate_level

    out = {}
    for c in concurrencies:
        config = BenchConfig(
            target="t",
            workload=SyntheticWorkload(Fixed(256), Fixed(32)),
            num_prompts=2 * c,
            concurrency=(c,),
        )
        level = simulate_level(true_deployment(), EngineConfig(), config, Level(f"c{c}", c, None))
        out[c] = level.result
    return out


def test_recovers_known_constants_from_replayed_bench_results(tmp_path):
    files = []
    for c, result in replayed_results().items():
        path = tmp_path / f"c{c}.json"
        path.write_text(json.dumps(result))
        files.append(path)
    steps = write_steps(tmp_path / "s.csv", [(0, 0, 2048), (16, 1024, 0)])
    result = calibrate([*files, steps], base_deployment(), EngineConfig(), resamples=20)
    for k, v in fitted(result).items():
        assert v == pytest.approx(TRUE[k], rel=0.01), k


def test_noisy_step_times_stay_within_the_stated_bound(tmp_path):
    # +-2% uniform noise on every step: each constant within 5% of the truth.
    noise = np.random.default_rng(7).uniform(-0.02, 0.02, len(STEPS))
    result = calibrate(
        [write_steps(tmp_path / "s.csv", STEPS, noise)], base_deployment(), EngineConfig()
    )
    for k, v in fitted(result).items():
        assert v == pytest.approx(TRUE[k], rel=0.05), k


def run_cli(*argv: str) -> int:
    return main(["calibrate", *argv, "--hardware", "h100-sxm", "--model", "llama-3.1-8b"])


def test_refuses_one_batch_size(tmp_path, capsys):
    path = write_steps(tmp_path / "s.csv", [(8, 1024, 0), (8, 1024, 0), (0, 0, 512)])
    assert run_cli(str(path), "--out", str(tmp_path / "o.toml")) == 2
    err = capsys.readouterr().err
    assert "one decode load only" in err and "two or more batch sizes" in err
    assert not (tmp_path / "o.toml").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("batch,seconds\n1,0.1\n", "expected the columns batch,context,new_tokens,seconds"),
        ("batch,context,new_tokens,seconds\n1,x,0,0.1\n", ":2: not numbers"),
        ("batch,context,new_tokens,seconds\n1,10,0,0\n", "non-positive seconds"),
    ],
)
def test_refuses_unreadable_step_files(tmp_path, capsys, text, message):
    path = tmp_path / "s.csv"
    path.write_text(text)
    assert run_cli(str(path), "--out", str(tmp_path / "o.toml")) == 2
    assert message in capsys.readouterr().err


def test_refuses_data_without_prefill(tmp_path, capsys):
    path = write_steps(tmp_path / "s.csv", [(1, 512, 0), (8, 1024, 0)])
    assert run_cli(str(path), "--out", str(tmp_path / "o.toml")) == 2
    assert "no prefill data" in capsys.readouterr().err


def test_profile_round_trips_through_predict_and_serve(tmp_path, capsys):
    out = tmp_path / "my-gpu.toml"
    assert run_cli(str(write_steps(tmp_path / "s.csv", STEPS)), "--out", str(out)) == 0
    assert "held out" in capsys.readouterr().out
    hw = load_hardware(str(out))
    assert hw.name == "my-gpu"
    for k, v in TRUE.items():
        assert getattr(hw.efficiency, k) == pytest.approx(v, rel=0.01)
        assert hw.sources[f"efficiency.{k}"] == "fitted by memorywall calibrate from s.csv"
    assert hw.kernels == load_hardware("h100-sxm").kernels  # the rest is the base profile's
    assert main(["predict", "--hardware", str(out), "--model", "llama-3.1-8b"]) == 0
    assert "my-gpu" in capsys.readouterr().out
    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "memorywall", "serve", "--hardware", str(out)]
    cmd += ["--model", "llama-3.1-8b", "--port", "0", "--ready-file", str(ready)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        data = wait_for(ready, proc, timeout_s=60)
        assert data is not None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_hidden_stack_held_out_within_target():
    # The target: a stack differing in efficiencies, floors and kernel costs, 2%
    # noise, other batches, contexts and prompt lengths held out.
    from memorywall.calibrate import synthetic
    from memorywall.calibrate.fit import CORE, SPECS

    r = synthetic.run(seed=0, resamples=20)
    assert r.median <= 0.03 and r.max <= 0.08, (r.median, r.max)
    assert np.max(np.abs(r.before_errors)) > 0.2  # the base profile misses it widely
    three = synthetic.run(seed=0, resamples=20, specs=tuple(s for s in SPECS if s.key in CORE))
    assert three.max > r.max  # three constants cannot absorb the difference
    by_name = {e.spec.name: e for e in r.estimates}
    assert sum(e.fitted for e in r.estimates) > 3
    per_step = by_name["latency.per_step_s"].verdict
    assert per_step.status == "not identifiable" and "latency.per_layer_s" in per_step.reason
    launch = by_name["latency.launch_per_layer_s"].verdict
    assert launch.status == "not identifiable" and "replayed from graphs" in launch.reason
    for e in r.estimates:
        if e.fitted:
            assert e.interval[0] <= e.value <= e.interval[1], e.spec.name
        else:
            assert e.value == e.base and e.interval is None, e.spec.name
    assert 0 < r.band[0] <= r.band[1] < 0.1


def test_recovers_every_identifiable_constant_from_noise_free_steps():
    # Attention, the per-stream KV cap and the per-layer floor differ too: the grid of
    # decode batches across contexts and prefills identifies each; per-step is collinear
    # with per-layer for one model and stays at base.
    from memorywall.calibrate import synthetic
    from memorywall.calibrate.fit import SPECS

    truth = {
        "efficiency.weight_read": 0.8,
        "efficiency.kv_read": 0.62,
        "efficiency.compute": 0.7,
        "efficiency.attention": 0.45,
        "kernels.kv_stream_bytes_per_s": 1.5e11,
        "latency.per_layer_s": 9e-5,
    }
    r = synthetic.run(seed=0, resamples=10, noise=0.0, hidden=truth)
    by_name = {e.spec.name: e for e in r.estimates}
    for name, value in truth.items():
        assert by_name[name].fitted, (name, by_name[name].verdict.reason)
        assert by_name[name].value == pytest.approx(value, rel=0.01), name
    assert not by_name["latency.per_step_s"].fitted
    assert np.max(np.abs(r.held_out_errors)) < 0.002
    assert {s.name for s in SPECS} == set(by_name)


def test_profile_carries_intervals_and_what_was_not_fitted(tmp_path, capsys):
    import tomllib

    out = tmp_path / "my-gpu.toml"
    assert run_cli(str(write_steps(tmp_path / "s.csv", STEPS)), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "90% interval" in printed and "prediction band" in printed
    data = tomllib.loads(out.read_text())
    for key in TRUE:
        q = data["efficiency"][key]
        assert q["interval"][0] <= q["value"] <= q["interval"][1]
        assert q["confidence"] == 0.9
    fit = data["calibration_fit"]
    assert fit["efficiency_weight_read"]["status"] == "fitted"
    assert fit["latency_launch_per_layer_s"]["status"] == "not identifiable"
    assert "no observation depends on it" in fit["latency_launch_per_layer_s"]["reason"]
    assert fit["interval"].startswith("bootstrap over observations, 200 resamples, seed 0")


MIXED = tuple((b, 1024, n) for b in (4, 16, 64) for n in (256, 512, 2048))


@pytest.mark.parametrize(
    ("truth", "execution", "extra"),
    [
        # The launch floor, from short prefills launched op by op (decode-graphs).
        ({"latency.launch_per_layer_s": 4.5e-4, "efficiency.compute": 0.7}, "decode-graphs", ()),
        # Overlap, from decodes beside prefill chunks.
        ({"efficiency.overlap": 0.3}, "graphs", MIXED),
        # Split-K and the activation traffic.
        (
            {"kernels.split_k_s": 1.2e-5, "kernels.activation_bytes_per_hidden": 120.0},
            "graphs",
            MIXED,
        ),
    ],
)
def test_recovers_each_identifiable_set(truth, execution, extra):
    from memorywall.calibrate import synthetic
    from memorywall.core.hardware import ExecutionMode

    base = dataclasses.replace(load_hardware("h100-sxm"), execution=ExecutionMode(execution))
    r = synthetic.run(seed=0, resamples=10, noise=0.0, hidden=truth, base=base, extra=extra)
    by_name = {e.spec.name: e for e in r.estimates}
    for name, value in truth.items():
        assert by_name[name].fitted, (name, by_name[name].verdict.reason)
        assert by_name[name].value == pytest.approx(value, rel=0.01), name
    assert np.max(np.abs(r.held_out_errors)) < 0.002


def write_scrape(path: Path, result: dict, load: str | None) -> Path:
    """A vLLM /metrics scrape with a bench result's means, split over two label sets."""
    n = result["completed"]
    half = {
        "vllm:time_to_first_token_seconds_sum": result["mean_ttft_ms"] / 1e3 * n / 2,
        "vllm:time_to_first_token_seconds_count": n / 2,
        "vllm:time_per_output_token_seconds_sum": result["mean_tpot_ms"] / 1e3 * n / 2,
        "vllm:time_per_output_token_seconds_count": n / 2,
        "vllm:request_success_total": n / 2,
        "vllm:prompt_tokens_total": result["total_input_tokens"] / 2,
        "vllm:generation_tokens_total": result["total_output_tokens"] / 2,
    }
    lines = [f"# memorywall load: {load}"] if load else []
    lines += ["# HELP vllm:num_requests_running running", "vllm:num_requests_running 0.0"]
    for reason in ("stop", "length"):
        for name, v in half.items():
            lines.append(f'{name}{{model_name="m",finished_reason="{reason}"}} {v!r}')
    lines.append('vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 3.0')
    path.write_text("\n".join(lines) + "\n")
    return path


RESULT = {
    "completed": 10,
    "mean_ttft_ms": 50.0,
    "mean_tpot_ms": 8.0,
    "total_input_tokens": 2560,
    "total_output_tokens": 320,
}


def test_reads_a_vllm_metrics_scrape(tmp_path):
    from memorywall.calibrate.fit import read_prometheus

    lv = read_prometheus(write_scrape(tmp_path / "c8.prom", RESULT, "concurrency=8"))
    assert (lv.concurrency, lv.rate, lv.requests, lv.prompt, lv.output) == (8, None, 10, 256, 32)
    assert lv.ttft_s == pytest.approx(0.05) and lv.tpot_s == pytest.approx(0.008)
    lv = read_prometheus(write_scrape(tmp_path / "r.prom", RESULT, "request_rate=2.5"))
    assert (lv.concurrency, lv.rate) == (None, 2.5)


@pytest.mark.parametrize(
    ("load", "drop", "message"),
    [
        (None, None, "say the load the scrape ran under"),
        ("users=3", None, "expected 'concurrency=N' or 'request_rate=R'"),
        ("concurrency=8", "vllm:time_per_output_token_seconds_sum", "not a vLLM metrics scrape"),
    ],
)
def test_refuses_a_scrape_without_its_load_or_metrics(tmp_path, capsys, load, drop, message):
    path = write_scrape(tmp_path / "c.prom", RESULT, load)
    if drop:
        path.write_text("\n".join(x for x in path.read_text().splitlines() if drop not in x))
    steps = write_steps(tmp_path / "s.csv", STEPS)
    assert run_cli(str(path), str(steps), "--out", str(tmp_path / "o.toml")) == 2
    assert message in capsys.readouterr().err


def test_recovers_known_constants_from_replayed_metrics_scrapes(tmp_path):
    files = [
        write_scrape(tmp_path / f"c{c}.prom", result, f"concurrency={c}")
        for c, result in replayed_results().items()
    ]
    steps = write_steps(tmp_path / "s.csv", [(0, 0, 2048), (16, 1024, 0)])
    result = calibrate([*files, steps], base_deployment(), EngineConfig(), resamples=20)
    for k, v in fitted(result).items():
        assert v == pytest.approx(TRUE[k], rel=0.01), k


def test_two_model_shapes_separate_the_per_step_floor_from_the_per_layer_one(tmp_path, capsys):
    # One model: a per-step floor moves every step as a per-layer floor does (32 layers x
    # per-layer), so only their sum is pinned. A second shape (Qwen3 32B: 64 layers)
    # separates them: both recovered, from the command line (MODEL=FILE).
    import tomllib

    from memorywall.calibrate import synthetic

    truth = {"latency.per_layer_s": 9e-5, "latency.per_step_s": 3e-4}
    hidden = synthetic.hidden_stack(load_hardware("h100-sxm"), truth)
    rows = synthetic.grid(False)
    small, big = (
        write_steps(
            tmp_path / f"{model}.csv", rows, deployment=plan_deployment(hidden, load_model(model))
        )
        for model in ("llama-3.1-8b", "qwen3-32b")
    )

    one = calibrate([small], base_deployment(), EngineConfig(), resamples=10)
    per_step = {e.spec.name: e for e in one.estimates}["latency.per_step_s"]
    assert not per_step.fitted and "latency.per_layer_s" in per_step.verdict.reason

    out = tmp_path / "two.toml"
    assert run_cli(str(small), f"qwen3-32b={big}", "--out", str(out), "--bootstrap", "10") == 0
    printed = capsys.readouterr().out
    assert "qwen3-32b step b=" in printed and "llama-3.1-8b step b=" in printed
    latency = tomllib.loads(out.read_text())["latency"]
    for name, value in truth.items():
        key = name.split(".")[1]
        assert latency[key]["value"] == pytest.approx(value, rel=0.01), name


@pytest.mark.parametrize(
    ("arg", "message"),
    [("=s.csv", "expected FILE or MODEL=FILE"), ("no-such-model=s.csv", "no-such-model")],
)
def test_refuses_a_bad_model_shape_argument(tmp_path, capsys, monkeypatch, arg, message):
    monkeypatch.chdir(tmp_path)
    write_steps(tmp_path / "s.csv", STEPS)
    assert run_cli("s.csv", arg, "--out", "o.toml") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.toml").exists()
