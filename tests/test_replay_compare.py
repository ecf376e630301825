"""benchmarks/replay_compare.py at tiny sizes: memorywall's rows always, Dynamo's where its
venv is (`python -m benchmarks.mocker_compare --setup`; not in CI)."""

from __future__ import annotations

import pytest

from benchmarks.replay_compare import (
    DYNAMO_VENV,
    STARTUP,
    Row,
    Work,
    child_env,
    dynamo,
    main,
    memorywall,
    startup,
    table,
)

TINY = Work(requests=12, users=4, prompt=64, output=8)


def test_memorywall_rows_count_the_same_work_each_way() -> None:
    rows = memorywall("wse-3", TINY)
    assert [r.what for r in rows] == ["engine", "simulate level", "simulate command"]
    assert {r.requests for r in rows} == {12}
    assert all(r.cpu_s > 0 and r.wall_s > 0 for r in rows)
    engine, level, command = rows
    # One model, one load: the same modelled span whether the engine runs alone or in a level.
    assert level.modelled_s == pytest.approx(engine.modelled_s, rel=0.05)
    assert command.modelled_s == level.modelled_s
    assert command.cpu_s > level.cpu_s  # an interpreter's start and imports at least


def test_table_sets_each_row_against_dynamos_replay() -> None:
    base = Row(side="dynamo", what="replay", hardware="H100-class", requests=100,
               cpu_s=0.5, wall_s=0.5, modelled_s=10.0)  # fmt: skip
    ours = Row(side="memorywall", what="engine", hardware="wse-3", requests=100,
               cpu_s=0.25, wall_s=0.3, modelled_s=1.0)  # fmt: skip
    lines = table([base, ours]).splitlines()
    assert lines[2].endswith("| 200 | 1.00x |")
    assert lines[3].endswith("| 4x | 400 | 2.00x |")
    assert table([ours]).endswith("| 400 |  |")  # no Dynamo: no ratio


def test_runs_without_dynamo_and_says_so(tmp_path, capsys) -> None:
    argv = ["--requests", "6", "--users", "2", "--input-len", "32", "--output-len", "4"]
    assert main([*argv, "--repeat", "1", "--hardware", "h100-sxm", "--dynamo-venv",
                 str(tmp_path)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "no Dynamo at" in out and "| memorywall | simulate command | h100-sxm | 6 |" in out
    assert "start-up floor of the command (CPU): interpreter " in out
    assert ", interpreter + numpy " in out and ", simulate's imports " in out


def test_startup_floor_grows_with_each_import_and_caches_bytecode(monkeypatch) -> None:
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    assert "PYTHONDONTWRITEBYTECODE" not in child_env()
    floor = startup(1)
    assert list(floor) == list(STARTUP)
    assert 0 < floor["interpreter"] < floor["simulate's imports"]


@pytest.mark.skipif(
    not (DYNAMO_VENV / "bin" / "python").exists(),
    reason="Dynamo's venv is absent (python -m benchmarks.mocker_compare --setup)",
)
def test_dynamo_replays_the_same_work() -> None:
    replay, process = dynamo(str(DYNAMO_VENV / "bin" / "python"), TINY)
    assert (replay.requests, process.requests) == (12, 12)
    assert 0 < replay.cpu_s < process.cpu_s
    assert replay.modelled_s > 0
