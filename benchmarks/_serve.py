"""Start `memorywall serve` in its own process for a benchmark and find its addresses
through its ready file (`memorywall.launch.serving`), never its log; read a server's
/metrics."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from memorywall.launch import serving  # benchmarks import it from here too

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")


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
