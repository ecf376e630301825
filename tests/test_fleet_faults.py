"""Worker-level faults in `memorywall fleet`: the `[[fault]]` schedule, per-worker `faults`,
`[tls]`, and a real fleet whose worker is paused, resumed and killed on schedule."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
from polling import block_until

from memorywall.client import Client
from memorywall.errors import ConfigError
from memorywall.fleet import runner as fleet
from memorywall.fleet import spec as fleet_spec
from memorywall.fleet.faults import WorkerAction, WorkerFault

WORKER = {"name": "a", "hardware": "wse-3", "model": "llama-3.1-8b"}
TIMEOUT_S = 60.0


def _spec(*workers: dict, **top: object) -> dict:
    return {"worker": list(workers), **top}


def test_schedule_parses_sorted_and_a_timed_pause_gains_its_resume():
    spec = fleet_spec.parse_spec(
        _spec(
            WORKER,
            {**WORKER, "name": "b", "faults": "error:0.2", "fault_seed": 3},
            fault=[
                {"worker": "a", "at_s": 5, "action": "kill"},
                {"worker": "b", "at_s": 1, "action": "pause", "for_s": 2.5},
            ],
        )
    )
    assert spec.faults == (
        WorkerFault(1.0, "b", WorkerAction.PAUSE),
        WorkerFault(3.5, "b", WorkerAction.RESUME),
        WorkerFault(5.0, "a", WorkerAction.KILL),
    )
    assert (spec.workers[1].faults, spec.workers[1].fault_seed) == ("error:0.2", 3)


@pytest.mark.parametrize(
    ("fault", "says"),
    [
        ({"worker": "zz", "at_s": 1, "action": "kill"}, "fault[0].worker: 'zz' is not a worker"),
        ({"worker": "a", "at_s": 1, "action": "nap"}, "fault[0].action: 'nap' is not one of"),
        ({"worker": "a", "at_s": -1, "action": "kill"}, "fault[0].at_s: must be >= 0"),
        ({"worker": "a", "at_s": "soon", "action": "kill"}, "fault[0].at_s: must be a number"),
        ({"worker": "a", "action": "kill"}, "fault[0].at_s: missing"),
        ({"worker": "a", "at_s": 1, "action": "kill", "for_s": 2}, "only a pause lasts"),
        ({"worker": "a", "at_s": 1, "action": "pause", "for_s": 0}, "for_s: must be > 0"),
        ({"worker": "a", "at_s": 1, "action": "kill", "when": 2}, "fault[0].when: unknown"),
    ],
)
def test_bad_faults_name_the_field(fault, says):
    with pytest.raises(ConfigError, match=None) as e:
        fleet_spec.parse_spec(_spec(WORKER, fault=[fault]))
    assert says in str(e.value)


def test_bad_worker_faults_and_tls_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"worker\[0\]\.faults: .*unknown kind 'boom'"):
        fleet_spec.parse_spec(_spec({**WORKER, "faults": "boom:0.1"}))
    with pytest.raises(ConfigError, match=r"tls\.cert: no such file"):
        fleet_spec.parse_spec(_spec(WORKER, tls={"cert": "x.pem", "key": "x.key"}), base=tmp_path)
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError, match=r"tls\.key: missing"):
        fleet_spec.parse_spec(_spec(WORKER, tls={"cert": "c.pem"}), base=tmp_path)
    (tmp_path / "k.pem").write_text("x")
    tls = fleet_spec.parse_spec(
        _spec(WORKER, tls={"cert": "c.pem", "key": "k.pem"}), base=tmp_path
    ).tls
    assert tls.cert == tmp_path / "c.pem" and tls.roots == tls.cert


def _state(pid: int) -> str:
    """The process state letter from /proc (T: stopped), or "gone"."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return "gone"
    return next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))


def test_a_fleet_pauses_resumes_and_kills_workers_on_schedule(tmp_path):
    spec = fleet_spec.parse_spec(
        _spec(
            WORKER,
            {**WORKER, "name": "b"},
            fault=[
                {"worker": "b", "at_s": 0.5, "action": "pause", "for_s": 1.5},
                {"worker": "a", "at_s": 3.0, "action": "kill"},
            ],
        )
    )
    out, stop = io.StringIO(), threading.Event()
    f = fleet.Fleet(spec, tmp_path, out=out, stop=stop, startup_timeout_s=TIMEOUT_S)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(f.run()))
    thread.start()
    try:
        block_until(lambda: f.ready is not None or not thread.is_alive(), TIMEOUT_S, 0.05)
        assert f.ready is not None, out.getvalue()
        a, b = f.ready.workers["a"], f.ready.workers["b"]
        seen: dict[str, set[str]] = {"a": set(), "b": set()}
        b_while_paused: list[bool] = []  # b's health, asked once while it was paused

        def a_killed_and_b_resumed() -> bool:
            """Watch both workers' states; ask b's health once, while it is paused."""
            seen["a"].add(_state(a.pid))
            seen["b"].add(_state(b.pid))
            if _state(b.pid) == "T" and not b_while_paused:
                with Client(b.grpc_target, timeout_s=0.5) as client:
                    b_while_paused.append(client.health())
            return _state(a.pid) in ("gone", "Z") and "T" in seen["b"] and _state(b.pid) != "T"

        block_until(a_killed_and_b_resumed, TIMEOUT_S, every_s=0.02, why=lambda: seen)
        assert "T" in seen["b"] and _state(b.pid) not in ("T", "gone", "Z")
        assert b_while_paused == [False]  # a paused worker does not answer
        assert _state(a.pid) in ("gone", "Z")
        with Client(b.grpc_target, timeout_s=5) as client:  # resumed: serving again
            assert client.complete(prompt_tokens=8, max_tokens=2, ignore_eos=True).usage
        assert thread.is_alive()  # a planned kill does not stop the fleet
    finally:
        stop.set()
        thread.join(timeout=TIMEOUT_S)
    assert result == [0], out.getvalue()
    log = [json.loads(line) for line in (tmp_path / "faults.jsonl").read_text().splitlines()]
    assert [(e["worker"], e["action"]) for e in log] == [
        ("b", "pause"),
        ("b", "resume"),
        ("a", "kill"),
    ]
    assert [e["t_s"] for e in log] == sorted(e["t_s"] for e in log)
    assert log[0]["t_s"] >= 0.5 and log[1]["t_s"] >= 2.0 and log[2]["t_s"] >= 3.0
    assert "fault: kill a at 3 s" in out.getvalue()


def test_tls_or_a_key_with_a_gateway_is_refused(tmp_path, monkeypatch):
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "k.pem").write_text("x")
    tls = {"cert": "c.pem", "key": "k.pem"}
    with pytest.raises(ConfigError, match=r"smg 1\.13 connects to gRPC workers in plaintext"):
        fleet_spec.parse_spec(_spec(WORKER, tls=tls, gateway={}), base=tmp_path)
    monkeypatch.setenv("MEMORYWALL_API_KEY", "sk-x")
    with pytest.raises(ConfigError, match="smg sends no API key"):
        fleet.run(fleet_spec.parse_spec(_spec(WORKER, gateway={})), tmp_path)


def test_gateway_args_pass_smg_options():
    spec = fleet_spec.parse_spec(_spec(WORKER, gateway={"args": ["--disable-retries"]}))
    assert spec.gateway.args == ("--disable-retries",)
    with pytest.raises(ConfigError, match=r"gateway\.args: must be a list of strings"):
        fleet_spec.parse_spec(_spec(WORKER, gateway={"args": "--disable-retries"}))
