"""Start `memorywall serve` in its own process for a benchmark and find its addresses."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_GRPC = re.compile(r"on 127\.0\.0\.1:(\d+)")
_HTTP = re.compile(r"(http://127\.0\.0\.1:\d+)")


@contextmanager
def serving(*args: str) -> Iterator[str]:
    """Yield the startup line of `memorywall serve --port 0 ARGS`; stop the server after."""
    cmd = [sys.executable, "-m", "memorywall", "serve", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if _GRPC.search(line):
                break
        else:
            raise RuntimeError(f"server exited: {' '.join(cmd)}")
        yield line
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def emulator(*args: str) -> Iterator[str]:
    """Yield the gRPC target (host:port) of a fresh server."""
    with serving(*args) as line:
        yield f"127.0.0.1:{_GRPC.search(line).group(1)}"


@contextmanager
def emulator_with_http(*args: str) -> Iterator[tuple[str, str]]:
    """Yield (gRPC target, HTTP base URL) of a fresh server with both fronts on one engine."""
    with serving(*args, "--http-port", "0") as line:
        yield f"127.0.0.1:{_GRPC.search(line).group(1)}", _HTTP.search(line).group(1)
