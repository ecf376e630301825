"""`memorywall demo --dashboard`: the dashboard on the demo's servers while they serve, its
URL printed, no browser opened without a graphical session, and gone with the demo."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request

from polling import block_until

from memorywall.dashboard.browser import graphical

URL = re.compile(r"dashboard: (http://127\.0\.0\.1:(\d+)/)")


def test_demo_serves_the_dashboard_on_its_servers(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "memorywall", "demo", "--hardware", "wse-3", "--levels", "1"]
    cmd += ["--output-len", "4", "--keep-serving", "--dashboard", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    log = tmp_path / "stdout"
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:

        def up() -> bool:
            assert proc.poll() is None, log.read_text()
            return "servers up" in log.read_text()

        block_until(up, 90, every_s=0.1, why=log.read_text)
        match = URL.search(log.read_text())
        assert match is not None, log.read_text()
        assert "opened in your browser" not in match.group(0)
        url, port = match.group(1), int(match.group(2))

        def column() -> dict | None:
            with urllib.request.urlopen(f"{url}api/snapshot", timeout=10) as r:
                [w] = json.load(r)["workers"]
            return w if w["up"] else None

        w = block_until(column, 20, every_s=0.2, why=log.read_text)
        assert (w["name"], w["hardware"], w["devices"]) == ("wse-3", "wse-3", 1)
        # The demo's load is over: the counters it left are there, the rates at rest.
        assert w["figures"]["power_w"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with socket.socket() as s:  # the dashboard went with the demo
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_browser_opens_only_in_a_graphical_session():
    assert not graphical({}, "linux")
    assert graphical({"DISPLAY": ":0"}, "linux")
    assert graphical({"WAYLAND_DISPLAY": "wayland-0"}, "linux")
    assert graphical({}, "darwin")
    assert graphical({}, "win32")
