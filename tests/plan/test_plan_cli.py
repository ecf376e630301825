"""`memorywall plan` from the command line: the table and files, and one-line errors."""

from __future__ import annotations

import json
import math

import pytest

from memorywall.cli import main

TINY = [
    "plan", "--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--precisions", "fp8",
    "--max-devices", "1", "--max-num-seqs", "4", "--input-len", "64", "--output-len", "16",
    "--num-prompts", "8", "--slo", "ttft=2s",
]  # fmt: skip


def test_prints_the_ranked_table_and_writes_json_and_plot(tmp_path, capsys):
    code = main([*TINY, "--per-user-tok-s", "50", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "1 x h100-sxm TP1 fp8 resident, max 4 seqs" in out
    assert "p99 TTFT <= 2000 ms, p99 TPOT <= 20 ms" in out
    doc = json.loads((tmp_path / "plan.json").read_text())
    assert doc["slo"]["tpot_s"] == pytest.approx(0.02)
    assert doc["best"]["h100-sxm"]["at_max_load"]["p99_tpot_ms"] <= 20
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_json_flag_prints_the_document(capsys):
    assert main([*TINY, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "llama-3.1-8b" and doc["best"]["h100-sxm"] is not None


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--slo", ""], "empty SLO"),
        (["--slo", "ttft=1s,tpot=10ms", "--per-user-tok-s", "50"], "TPOT bound once"),
        (["--precisions", "fp7"], "unknown 'fp7'"),
        (["--placements", "floppy"], "unknown 'floppy'"),
        (["--max-num-seqs", "0"], "must be >= 1"),
        (["--load", "bursts"], "invalid choice"),
        (["--hardware", "tpu-v9"], "unknown hardware"),
        (["--per-user-tok-s", "-3"], "must be > 0"),
        (["--tolerance", "2"], "must be in"),
    ],
)
def test_bad_flags_are_one_line_errors_with_exit_2(capsys, extra, words):
    argv = [*TINY, *extra]
    if "--slo" in extra:
        argv = argv[: argv.index("--slo")] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("memorywall: error:") and words in err


def test_no_slo_is_an_error(capsys):
    argv = TINY[: TINY.index("--slo")]
    assert main(argv) == 2
    assert "give an SLO" in capsys.readouterr().err


def test_target_rate_counts_replicas(capsys):
    assert main([*TINY, "--target-rate", "100", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["best"]["h100-sxm"]
    per_replica = best["at_max_load"]["request_goodput"]
    assert best["replicas_for_target"] == math.ceil(100 / per_replica)
    assert best["devices_for_target"] == best["replicas_for_target"] * best["devices"]


def test_shared_prefix_workload_and_closed_loop(capsys):
    argv = [*TINY, "--workload", "shared-prefix:2:32", "--load", "users"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "max load (users)" in out and "1 x h100-sxm TP1 fp8" in out


def test_ep_flag_asks_for_expert_parallel_layouts():
    from memorywall.cli import build_parser
    from memorywall.cli.plan import query_and_space

    _, space = query_and_space(build_parser().parse_args([*TINY, "--ep"]))
    assert space.expert_parallel
    _, space = query_and_space(build_parser().parse_args(TINY))
    assert not space.expert_parallel
