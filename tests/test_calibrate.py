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


def write_steps(path: Path, rows, noise: np.ndarray | None = None) -> Path:
    sm = StepModel(true_deployment())
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


def test_recovers_known_constants_from_replayed_bench_results(tmp_path):
    from memorywall.loadgen.bench import BenchConfig, Level
    from memorywall.loadgen.workload import Fixed, SyntheticWorkload
    from memorywall.sim.simulate import simulate_level

    files = []
    for c in (1, 8):
        config = BenchConfig(
            target="t",
            workload=SyntheticWorkload(Fixed(256), Fixed(32)),
            num_prompts=2 * c,
            concurrency=(c,),
        )
        r = simulate_level(true_deployment(), EngineConfig(), config, Level(f"c{c}", c, None))
        path = tmp_path / f"c{c}.json"
        path.write_text(json.dumps(r.result))
        files.append(path)
    steps = write_steps(tmp_path / "s.csv", [(0, 0, 2048), (16, 1024, 0)])
    result = calibrate([*files, steps], base_deployment(), EngineConfig())
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
