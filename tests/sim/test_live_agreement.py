"""One light level run live (server + bench over loopback) and simulated: the same engine
gives the same modelled timeline, and the two write the same result keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks._serve import emulator
from memorywall.cli import main

DEPLOYMENT = ["--hardware", "wse-3", "--model", "llama-3.1-8b"]
LOAD = ["--concurrency", "1", "--num-prompts", "6", "--input-len", "256", "--output-len", "32"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict, Path, Path]:
    live_dir = tmp_path_factory.mktemp("live")
    sim_dir = tmp_path_factory.mktemp("sim")
    with emulator(*DEPLOYMENT, "--grace", "1") as target:
        assert main(["bench", "--target", target, *LOAD, "--out", str(live_dir)]) == 0
    assert main(["simulate", *DEPLOYMENT, *LOAD, "--out", str(sim_dir)]) == 0
    live = json.loads((live_dir / "run-c1.json").read_text())
    sim = json.loads((sim_dir / "sim-c1.json").read_text())
    return live, sim, live_dir, sim_dir


def test_modelled_timelines_agree(runs) -> None:
    live, sim, _, _ = runs
    assert live["completed"] == sim["completed"] == 6
    assert sim["mean_tpot_ms"] == pytest.approx(live["mean_modelled_tpot_ms"], rel=0.01)
    assert sim["mean_ttft_ms"] == pytest.approx(live["mean_modelled_ttft_ms"], rel=0.05)
    # Live, the client sees transport on top; the simulated client is ideal.
    assert live["client_overhead_ttft_ms"] > -0.01
    assert sim["client_overhead_ttft_ms"] == pytest.approx(0.0, abs=1e-5)


def test_same_files_and_keys(runs) -> None:
    live, sim, live_dir, sim_dir = runs
    assert live.keys() == sim.keys()
    assert (live["simulated"], sim["simulated"]) == (False, True)
    first = json.loads((live_dir / "run-c1.requests.jsonl").open().readline())
    assert first.keys() == json.loads((sim_dir / "sim-c1.requests.jsonl").open().readline()).keys()
    assert sorted(p.name.replace("run", "sim") for p in live_dir.iterdir()) == sorted(
        p.name for p in sim_dir.iterdir() if p.name != "wall_time.json"
    )
