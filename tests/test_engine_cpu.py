"""benchmarks/engine_cpu.py at a tiny size: every row measured, the JSON as documented."""

import json

import pytest

from benchmarks import engine_cpu


def test_tiny_run_measures_both_engines(capsys):
    argv = ["--hardware", "wse-3", "--batch", "1,3", "--rounds", "2"]
    assert engine_cpu.main([*argv, "--input-len", "16", "--output-len", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["mode"], r["batch"]) for r in rows] == [
        ("OFFLINE", 1),
        ("LIVE", 1),
        ("OFFLINE", 3),
        ("LIVE", 3),
    ]
    for r in rows:
        assert r["requests"] == 2 * r["batch"] and r["tokens"] == 4 * r["requests"]
        assert r["cpu_s"] > 0 and r["cpu_per_token_us"] == r["cpu_s"] / r["tokens"] * 1e6
        assert r["modelled_s"] > 0
    for r in rows[1::2]:  # LIVE: the stalls the engine reported, within its decode time
        assert r["decode_s"] > 0 and 0 <= r["decode_host_stall_s"] <= r["decode_s"]
        assert r["stall_share"] == r["decode_host_stall_s"] / r["decode_s"]
        # Every token reached a reader in some message, never more messages than tokens.
        assert 0 < r["messages"] <= r["tokens"]
        assert r["tokens_per_message"] == r["tokens"] / r["messages"]
    for r in rows[::2]:
        assert r["decode_s"] is None and r["stall_share"] is None
        assert r["messages"] is None and r["tokens_per_message"] is None


def test_table_has_a_line_per_row():
    todo = engine_cpu.requests(2, 1, 16, 4)
    rows = [engine_cpu.offline("h100-sxm", 2, todo), engine_cpu.live("h100-sxm", 2, todo)]
    lines = engine_cpu.table(rows).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| OFFLINE | h100-sxm | 2 | 2 | 8 ")
    assert lines[3].startswith("| LIVE | h100-sxm | 2 | 2 | 8 ") and lines[3].endswith("% |")


def test_stepped_live_rows_never_stall_and_group_under_a_short_budget(capsys):
    argv = ["--hardware", "wse-3", "--batch", "8", "--rounds", "1", "--stepped"]
    rate = ["--max-messages-per-s", "2000"]  # 8 wafer streams want ~14k messages a second
    assert engine_cpu.main([*argv, *rate, "--output-len", "40", "--json"]) == 0
    offline, stepped = json.loads(capsys.readouterr().out)
    assert offline["mode"] == "OFFLINE" and stepped["mode"] == "STEPPED"
    assert engine_cpu.main([*argv, "--output-len", "4", "--live-only", "--json"]) == 0
    assert [r["mode"] for r in json.loads(capsys.readouterr().out)] == ["STEPPED"]
    # The clock jumps to each deadline: never late, so no stall moved the timeline.
    assert stepped["decode_host_stall_s"] == 0 and stepped["stall_share"] == 0
    assert stepped["tokens"] == 8 * 40 and stepped["tokens_per_message"] > 2


def test_a_bad_message_budget_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        engine_cpu.main(["--max-messages-per-s", "0"])
    assert e.value.code == 2
    assert "--max-messages-per-s" in capsys.readouterr().err
