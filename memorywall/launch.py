"""Child processes of `memorywall serve` (and smg): started, waited for, stopped, one way.

The demo, the fleet and the benchmarks all start servers as children: `start` runs a
command with its output in a log file (or the parent's), in its own session so that a
terminal's Ctrl-C reaches the parent alone, which stops them, and optionally SIGTERMed by
the kernel when the parent dies, even by SIGKILL (Linux). `wait_ready` polls each server's
ready file (`memorywall.ready`) until all are up, one exits (`ChildExited`, with its log's
tail) or the time runs out (`NotReady`); `stop` sends SIGTERM, waits, then SIGKILLs.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memorywall.ready import ReadyError, ServerReady, poll

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def serve_command(args: Sequence[str], ready_file: Path) -> list[str]:
    """`python -m memorywall serve ARGS --ready-file F`, with this process's Python."""
    return [sys.executable, "-m", "memorywall", "serve", *args, "--ready-file", str(ready_file)]


@dataclass
class Child:
    """A started process: its name, its log (None: it writes to the parent's output), and
    for a server the ready file it writes and, once read, what that file says."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path | None = None
    ready_file: Path | None = None
    ready: ServerReady | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def served(self) -> ServerReady:
        """What its ready file says, once `wait_ready` (or `poll_ready`) has read it."""
        if self.ready is None:
            raise ReadyError(f"{self.name} is not ready")
        return self.ready

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 10) -> str:
        """The last `n` lines of its log, indented."""
        lines = self._lines()
        if lines is None:
            return "    (no log)"
        return "\n".join(f"    {line}" for line in lines[-n:]) or "    (empty log)"

    def last_line(self) -> str:
        """The last non-blank line of its log, or ""."""
        lines = [x.strip() for x in self._lines() or [] if x.strip()]
        return lines[-1] if lines else ""

    def _lines(self) -> list[str] | None:
        if self.log is None:
            return None
        try:
            return self.log.read_text(errors="replace").splitlines()
        except OSError:
            return None


class ChildExited(ReadyError):
    """A child exited before it was ready; `child` has its status and log."""

    def __init__(self, child: Child, message: str) -> None:
        super().__init__(message)
        self.child = child


class NotReady(ReadyError):
    """Servers still not ready when the time ran out; `late` names them."""

    def __init__(self, late: list[Child], timeout_s: float) -> None:
        super().__init__(f"{', '.join(c.name for c in late)} did not start within {timeout_s:g} s")
        self.late = late


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the parent dies, even by SIGKILL (Linux)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start(
    name: str,
    cmd: Sequence[str],
    *,
    log: Path | None = None,
    ready_file: Path | None = None,
    own_session: bool = True,
    die_with_parent: bool = False,
) -> Child:
    """Run `cmd`, stdout and stderr to `log` (None: the parent's), stdin closed.

    `own_session`: a terminal's Ctrl-C reaches the parent only, which stops the child.
    `die_with_parent`: the kernel SIGTERMs the child when the thread that started it
    ends (Linux; the parent's death included). A stale `ready_file` is removed first.
    """
    if ready_file is not None:
        ready_file.unlink(missing_ok=True)
    kwargs: dict[str, Any] = {"start_new_session": own_session, "stdin": subprocess.DEVNULL}
    if die_with_parent:
        kwargs["preexec_fn"] = _die_with_parent
    if log is None:
        proc = subprocess.Popen(list(cmd), **kwargs)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as f:
            proc = subprocess.Popen(list(cmd), stdout=f, stderr=f, **kwargs)
    return Child(name, proc, log, ready_file)


def start_serve(
    name: str, args: Sequence[str], ready_file: Path, *, log: Path | None = None, **kwargs
) -> Child:
    """`memorywall serve ARGS` writing its ready file to `ready_file`; see `start`."""
    return start(name, serve_command(args, ready_file), log=log, ready_file=ready_file, **kwargs)


def poll_ready(child: Child) -> ServerReady | None:
    """What the child's ready file says once it is written (kept in `child.ready`); None
    before. Raises ChildExited if it exited first, ReadyError for an unreadable file."""
    if child.ready is None:
        assert child.ready_file is not None, f"{child.name} writes no ready file"
        try:
            data = poll(child.ready_file, child.proc)
        except ReadyError as e:
            if child.alive():
                raise
            raise ChildExited(child, str(e)) from None
        if data is not None:
            child.ready = ServerReady.from_dict(data, str(child.ready_file))
    return child.ready


def wait_ready(
    children: Sequence[Child],
    *,
    timeout_s: float,
    stop: threading.Event | None = None,
    poll_s: float = 0.05,
) -> bool:
    """Wait until every child's ready file is there (each in `child.ready`); False if
    `stop` is set first. Raises ChildExited or NotReady."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout_s
    while True:
        late = [c for c in children if poll_ready(c) is None]
        if not late:
            return True
        if time.monotonic() > deadline:
            raise NotReady(late, timeout_s)
        if stop.wait(poll_s):
            return False


def stop(
    children: Sequence[Child],
    *,
    timeout_s: float,
    on_kill: Callable[[Child], None] | None = None,
) -> None:
    """SIGTERM every child still running, in the order given, wait for them all up to
    `timeout_s`, then SIGKILL the rest (`on_kill` is told of each first). A paused child
    (SIGSTOP) is continued, so that it can stop."""
    alive = [c for c in children if c.alive()]
    for c in alive:
        c.proc.send_signal(signal.SIGCONT)
        c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for c in alive:
        try:
            c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if on_kill is not None:
                on_kill(c)
            c.proc.kill()
            c.proc.wait()


@contextmanager
def serving(
    *args: str, timeout_s: float = 60.0, stop_timeout_s: float = 15.0
) -> Iterator[ServerReady]:
    """`memorywall serve --port 0 ARGS` in a process of its own, writing to this process's
    output (a Ctrl-C reaches both); yields what its ready file says once every listener is
    up, and stops the server after. Raises ChildExited or NotReady."""
    with tempfile.TemporaryDirectory(prefix="memorywall-serve-") as tmp:
        ready_file = Path(tmp) / "ready.json"
        child = start_serve("serve", ["--port", "0", *args], ready_file, own_session=False)
        try:
            wait_ready([child], timeout_s=timeout_s)
            yield child.served
        finally:
            stop([child], timeout_s=stop_timeout_s)
