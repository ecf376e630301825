"""`memorywall simulate` on a disaggregated deployment: the same files, the split's timeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memorywall.cli import main
from memorywall.core import (
    Batch,
    PrefillChunk,
    StepModel,
    load_hardware,
    load_model,
    plan_deployment,
)
from memorywall.core.kv_transfer import kv_link, kv_transfer

SPLIT = ["--hardware", "wse-3", "--model", "llama-3.1-8b", "--prefill-hardware", "h100-sxm"]


def test_one_user_sees_prefill_plus_transfer_plus_a_decode_step(tmp_path: Path) -> None:
    argv = [*SPLIT, "--prefill-workers", "2", "--kv-link", "25"]
    argv += ["--input-len", "512", "--output-len", "8", "--num-prompts", "6"]
    assert main(["simulate", *argv, "--concurrency", "1,4", "--plots", "--out", str(tmp_path)]) == 0
    c1, c4 = json.loads((tmp_path / "summary.json").read_text())
    assert c1["simulated"] and (c1["completed"], c1["failed"]) == (6, 0)
    assert c1["hardware"] == "2P x 1 h100-sxm + 1D x 1 wse-3" and c1["devices"] == 3
    assert c1["total_output_tokens"] == 6 * 8
    h100 = plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-8b"))
    wse = plan_deployment(load_hardware("wse-3"), load_model("llama-3.1-8b"))
    prefill_s = StepModel(h100).step_cost(Batch(prefill=[PrefillChunk(512)])).time_s
    first_s = StepModel(wse).step_cost(Batch(prefill=[PrefillChunk(1, 511)])).time_s
    transfer_s = kv_transfer(h100, kv_link(h100, wse, 25.0), 512).exposed_s
    assert c1["mean_ttft_ms"] == pytest.approx((prefill_s + transfer_s + first_s) * 1e3, abs=1e-5)
    assert c1["predicted_ttft_ms"] is None  # no one profile predicts a split fleet
    assert c4["mean_ttft_ms"] > c1["mean_ttft_ms"]  # four users share the prefill workers
    for name in (
        "sim-c1.requests.jsonl",
        "sim-c1.tokens.npz",
        "latency_vs_load.png",
        "wall_time.json",
    ):
        assert (tmp_path / name).stat().st_size > 0


def test_a_bad_link_is_a_one_line_error(capsys) -> None:
    assert main(["simulate", *SPLIT, "--kv-link", "fast", "--num-prompts", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--kv-link" in err
