"""Start `memorywall serve` in its own process for a benchmark and find its addresses
through its ready file (`memorywall/ready.py`), never its log; read a server's /metrics."""

from __future__ import annotations

import re
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from memorywall import launch
from memorywall.ready import ServerReady

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")


@contextmanager
def serving(*args: str) -> Iterator[ServerReady]:
    """Yield what `memorywall serve --port 0 ARGS` reports once ready; stop the server after."""
    with tempfile.TemporaryDirectory(prefix="memorywall-bench-") as tmp:
        # Its output is the benchmark's; a Ctrl-C reaches both.
        child = launch.start_serve(
            "serve", ["--port", "0", *args], Path(tmp) / "ready.json", own_session=False
        )
        try:
            launch.wait_ready([child], timeout_s=START_TIMEOUT_S)
            yield child.ready
        finally:
            launch.stop([child], timeout_s=STOP_TIMEOUT_S)


@contextmanager
def emulator(*args: str) -> Iterator[str]:
    """Yield the gRPC target (host:port) of a fresh server."""
    with serving(*args) as ready:
        yield ready.grpc_target


@contextmanager
def emulator_with_http(*args: str) -> Iterator[tuple[str, str]]:
    """Yield (gRPC target, HTTP base URL) of a fresh server with both fronts on one engine."""
    with serving(*args, "--http-port", "0") as ready:
        yield ready.grpc_target, ready.http_url


def scrape(url: str) -> list[tuple[str, str, float]]:
    """Every sample a Prometheus text endpoint serves: (name, its `{labels}` text or "", value)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    samples = []
    for line in text.splitlines():
        if not line.startswith("#") and (m := _SAMPLE.match(line)):
            samples.append((m.group(1), m.group(2) or "", float(m.group(3))))
    return samples
