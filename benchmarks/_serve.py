"""Start `memorywall serve` in its own process for a benchmark and find its port."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_PORT = re.compile(r"on 127\.0\.0\.1:(\d+)")


@contextmanager
def emulator(*args: str) -> Iterator[str]:
    """Yield the target of a server started with `memorywall serve --port 0 ARGS`."""
    cmd = [sys.executable, "-m", "memorywall", "serve", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            match = _PORT.search(line)
            if match:
                break
        else:
            raise RuntimeError(f"server exited: {' '.join(cmd)}")
        yield f"127.0.0.1:{match.group(1)}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
