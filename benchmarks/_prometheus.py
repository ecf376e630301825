"""A real Prometheus (Debian's `prometheus` binary) on loopback, for a benchmark or a test:
started on a scrape config with its data in a folder, asked PromQL over its HTTP API,
stopped. Nothing of it reaches past 127.0.0.1."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any


class PromQLError(RuntimeError):
    """Prometheus refused a query (its message)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """`prometheus` on 127.0.0.1 with its data in `folder`; its output in
    `folder/prometheus.log`."""

    def __init__(self, binary: str, config: Path, folder: Path) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = folder / "prometheus.log"
        cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}"]
        cmd += [f"--web.listen-address={self.url.removeprefix('http://')}"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant vector `expr` gives now (or at Unix time `at`)."""
        params = {"query": expr} | ({} if at is None else {"time": f"{at:.3f}"})
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            raise PromQLError(f"{expr}: {e.read().decode()}") from None
        if body["status"] != "success":
            raise PromQLError(f"{expr}: {body}")
        return body["data"]["result"]

    def ready(self) -> bool:
        """True once it serves; RuntimeError with its log's end if it exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
