"""`memorywall demo` end to end at a tiny size: real servers, real load, nothing left behind."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from polling import block_until

from memorywall.cli import main
from memorywall.client import Client
from memorywall.demo import report as demo_report
from memorywall.demo import runner as demo
from memorywall.loadgen.bench import stall_doubt

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEMO = [sys.executable, "-m", "memorywall", "demo"]
TINY = ["--levels", "1,2", "--input-len", "32", "--output-len", "8"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")  # a zombie runs nothing
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _all_gone(pids: list[int], timeout_s: float = 15) -> None:
    block_until(lambda: all(_gone(p) for p in pids), timeout_s, every_s=0.05, why=lambda: pids)


def _ready_servers(folder: Path, proc: subprocess.Popen, names: list[str]) -> dict[str, dict]:
    """Each server's ready file as the demo's servers write it (the demo's own signal)."""
    out: dict[str, dict] = {}

    def all_ready() -> bool:
        assert proc.poll() is None, f"demo exited {proc.returncode}"
        for name in names:
            path = folder / "servers" / f"{name}.ready.json"
            if name not in out and path.exists():
                out[name] = json.loads(path.read_text())
        return len(out) == len(names)

    block_until(all_ready, 90, every_s=0.05, why=lambda: f"servers ready: {sorted(out)}")
    return out


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [*DEMO, *TINY, "--out", str(out)], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # Both backends at both levels, measured with the core's prediction below.
    for name in ("wse-3 x1", "h100-sxm x1"):
        rows = [line for line in lines if re.match(rf"^\d*\s+{name}\s+measured\*?\s+\d", line)]
        assert len(rows) == 2, proc.stdout
    predicted = [line for line in lines if line.split()[:1] == ["predicted"]]
    assert len(predicted) == 4
    simulated = [line for line in lines if line.split()[:1] == ["simulated"]]
    assert len(simulated) == 4
    assert f"wrote {out}/" in proc.stdout
    assert "ready: wse-3 x1 at 127.0.0.1:" in proc.stderr

    raw = json.loads((out / "results.json").read_text())
    # The headline is measured where both rows of a level are faithful (not marked *).
    wse_levels, h100_levels = raw["results"]["wse-3"], raw["results"]["h100-sxm"]
    faithful = any(
        not a["suspect"] and not b["suspect"] for a, b in zip(wse_levels, h100_levels, strict=True)
    )
    kind = "(measured)" if faithful else "(simulated: every measured row is marked *)"
    assert f"Per-user speed, wse-3 x1 over h100-sxm x1 {kind}" in proc.stdout
    assert set(raw["servers"]) == {"wse-3", "h100-sxm"}
    for hw, levels in raw["results"].items():
        assert [r["max_concurrency"] for r in levels] == [1, 2]
        for r in levels:
            assert r["completed"] == 4 and r["failed"] == 0
            assert r["hardware"] == hw and r["model"] == "llama-3.1-8b"
            assert r["predicted_tpot_ms"] > 0 and r["tdp_w"] > 0
        assert json.loads((out / hw / "summary.json").read_text()) == levels
        assert (out / hw / f"{hw}-c2.requests.jsonl").exists()
        # One user on the virtual clock decodes at the core's steady-state step.
        assert levels[0]["offline"]["mean_tpot_ms"] == pytest.approx(
            levels[0]["predicted_tpot_ms"], rel=0.02
        )
    # The wafer's step is shorter than the GPU's, in the core's prediction.
    wse, h100 = raw["results"]["wse-3"][0], raw["results"]["h100-sxm"][0]
    assert wse["predicted_tpot_ms"] < h100["predicted_tpot_ms"]
    assert (out / "table.txt").read_text().strip() in proc.stdout
    for png in ("per_user_vs_load.png", "throughput_vs_interactivity.png", "latency_vs_load.png"):
        assert (out / png).read_bytes().startswith(PNG_MAGIC), png
    # The servers are gone, and so are their ready files.
    _all_gone([s["pid"] for s in raw["servers"].values()])
    assert sorted(p.name for p in (out / "servers").iterdir()) == ["h100-sxm.log", "wse-3.log"]


def test_sigint_mid_run_leaves_no_process_behind(tmp_path):
    out = tmp_path / "demo"
    # h100-sxm first, 2000-token outputs: its first level alone would take about a minute.
    cmd = [*DEMO, "--hardware", "h100-sxm,wse-3", "--levels", "1", "--output-len", "2000"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        servers = _ready_servers(out, proc, ["h100-sxm", "wse-3"])
        with Client(servers["h100-sxm"]["grpc_target"], timeout_s=5) as client:
            # The sweep is under way.
            block_until(lambda: client.server_info().running >= 1, 30, every_s=0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == demo.EXIT_INTERRUPTED, stderr
    assert "interrupted; servers stopped" in stderr
    assert "wrote" not in stdout
    _all_gone([s["pid"] for s in servers.values()])
    assert not list((out / "servers").glob("*.ready.json"))


def test_servers_die_with_a_killed_demo(tmp_path):
    """SIGKILL gives the demo no chance to clean up: its servers stop by themselves."""
    out = tmp_path / "demo"
    cmd = [*DEMO, "--hardware", "h100-sxm", "--levels", "1", "--output-len", "2000"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        servers = _ready_servers(out, proc, ["h100-sxm"])
    finally:
        proc.kill()
        proc.wait()
    _all_gone([s["pid"] for s in servers.values()])


def test_keep_serving_leaves_servers_up_until_sigterm(tmp_path):
    out = tmp_path / "demo"
    cmd = [*DEMO, "--hardware", "wse-3", "--levels", "1", "--output-len", "4", "--keep-serving"]
    log = tmp_path / "stdout"
    with log.open("w") as f:
        proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=f, stderr=subprocess.STDOUT)
    try:
        wse = _ready_servers(out, proc, ["wse-3"])["wse-3"]

        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            return "servers up" in log.read_text()

        block_until(up, 60, every_s=0.05, why=log.read_text)
        text = log.read_text()
        assert f"memorywall bench --target {wse['grpc_target']}" in text
        assert f"curl -N {wse['http_url']}/v1/completions" in text
        assert f"OpenAI(base_url='{wse['http_url']}/v1'" in text
        assert f"smg launch --worker-urls grpc://{wse['grpc_target']}" in text
        with urllib.request.urlopen(f"{wse['http_url']}/v1/models", timeout=10) as r:
            assert json.load(r)["data"][0]["id"] == "llama-3.1-8b"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == demo.EXIT_INTERRUPTED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _all_gone([wse["pid"]])


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--hardware", "abacus"], "abacus"),
        (["--hardware", "wse-3,wse-3"], "--hardware: wse-3 named twice"),
        (["--model", "gpt-9"], "gpt-9"),
        (["--levels", "0"], "--levels"),
        (["--levels", "1,x"], "--levels"),
        (["--output-len", "0"], "--output-len"),
    ],
)
def test_bad_flags_are_one_line_exit_2(tmp_path, capsys, argv, fragment):
    assert main(["demo", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("memorywall: error:") and err.count("\n") == 1 and fragment in err
    assert not (tmp_path / "o").exists()


def test_a_server_that_cannot_start_is_one_line_exit_1(tmp_path, monkeypatch):
    monkeypatch.setattr(demo.sys, "executable", "/bin/false")  # every spawn exits at once
    config = demo.DemoConfig(hardware=("wse-3",), levels=(1,), out=tmp_path / "o")
    err = io.StringIO()
    assert demo.run(config, out=io.StringIO(), err=err) == 1
    last = err.getvalue().splitlines()[-1]
    assert last == "memorywall: error: the wse-3 server exited with status 1 before it was ready"


def _level(users: int, **extra: object) -> dict:
    return {
        "max_concurrency": users,
        "request_rate": None,
        "level": f"c{users}",
        "completed": 4,
        "total_output_tokens": 256,
        "output_throughput": 500.0 * users,
        "mean_ttft_ms": 3.0,
        "mean_tpot_ms": 2.0,
        "predicted_ttft_ms": 2.5,
        "predicted_tpot_ms": 1.9,
        "predicted_e2el_ms": 2.5 + 63 * 1.9,
        "devices": 2,
        "tdp_w": 500.0,
        "suspect": [],
        **extra,
    }


def test_table_marks_rows_the_machine_could_not_emulate(tmp_path):
    config = demo.DemoConfig(hardware=("h100-sxm",), levels=(1, 8), out=tmp_path)
    quiet = _level(1, suspect=[])
    doubt = stall_doubt(40, 0.2, 1.0)  # 20% of the level
    assert stall_doubt(2, 0.01, 1.0) is None  # 1%
    stalled = _level(8, suspect=[doubt])
    text = demo_report.table(config, [("h100-sxm x2", [quiet, stalled])])
    rows = [line for line in text.splitlines() if "measured" in line and "x2" in line]
    assert rows[0].split()[3] == "measured"  # users, hardware (two words), mark
    assert rows[1].split()[3] == "measured*"
    assert (
        "* h100-sxm x2, 8 users: the server's host stalled 40 times, moving its timeline "
        "200 ms later in 1.0 s" in text
    )
    assert "1 user:" not in text
    # 500 tok/s in total: 250 per device, 500 per kW of rated power (2 devices x 500 W).
    assert rows[0].split()[-3:] == ["500", "250", "500"]


def _ratio(text: str) -> str:
    (line,) = [x for x in text.splitlines() if x.startswith("Per-user speed")]
    return line


def test_headline_ratio_uses_only_faithful_measured_rows(tmp_path):
    """A level where either backend's measured row is marked * gives its simulated ratio,
    said so; a level without a simulation to fall back on is left out."""
    config = demo.DemoConfig(hardware=("wse-3", "h100-sxm"), levels=(1, 8, 32), out=tmp_path)
    doubt = stall_doubt(40, 0.2, 1.0)
    offline = {"mean_tpot_ms": 1.0, "output_throughput": 1.0}
    wafer = [
        _level(1, mean_tpot_ms=1.0),
        _level(8, mean_tpot_ms=2.0),
        # Marked: its measured TPOT (99 ms) must not reach the headline; the simulated one does.
        _level(32, mean_tpot_ms=99.0, suspect=[doubt], offline=offline),
    ]
    gpu = [
        _level(1, mean_tpot_ms=13.0),
        _level(8, mean_tpot_ms=22.0),
        _level(32, mean_tpot_ms=3.0, offline={**offline, "mean_tpot_ms": 9.5}),
    ]
    text = demo_report.table(config, [("wse-3 x1", wafer), ("h100-sxm x1", gpu)])
    assert _ratio(text) == (
        "Per-user speed, wse-3 x1 over h100-sxm x1 (measured): 13.0x at 1 user, "
        "11.0x at 8 users; simulated, where a measured row is marked *: 9.5x at 32 users."
    )
    # Every level marked: the simulated ratios alone, and the line says so.
    marked = [{**r, "suspect": [doubt], "offline": offline} for r in wafer]
    text = demo_report.table(config, [("wse-3 x1", marked), ("h100-sxm x1", gpu)])
    assert _ratio(text) == (
        "Per-user speed, wse-3 x1 over h100-sxm x1 (simulated: every measured row is "
        "marked *): 9.5x at 32 users."
    )
    # Marked, and nothing simulated to fall back on: the level is left out.
    bare = [{k: v for k, v in r.items() if k != "offline"} for r in marked]
    text = demo_report.table(config, [("wse-3 x1", bare), ("h100-sxm x1", gpu)])
    assert not [x for x in text.splitlines() if x.startswith("Per-user speed")]
