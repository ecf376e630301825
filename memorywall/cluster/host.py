"""What a `fleet --ray` actor does on its node: run one worker's `memorywall serve` and
answer for it (its node, readiness, liveness, faults, stop).

A plain class, with no Ray in it: `memorywall.cluster.fleet` makes it an actor
(`ray.remote(WorkerHost)`), and a test can drive it directly. The serve process is started
by `memorywall.launch` (the one launcher) from a keeper thread that lives as long as the
process, with the kernel told to SIGTERM it when that thread ends: if the actor's process
dies (its node lost, `ray stop`), the server goes with it.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any

from memorywall import launch
from memorywall.launch import Child
from memorywall.ready import ReadyError


class WorkerHost:
    """One worker's serve process on this node, bound to `host` (None, inside an actor: the
    address the node joined the cluster with), logging to `log_dir` on this node."""

    def __init__(
        self, name: str, serve_args: list[str], log_dir: str, host: str | None = None
    ) -> None:
        if host is None:
            host = _node_address()
        folder = Path(log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.name, self.host = name, host
        self._ready_file = folder / f"{name}.ready.json"
        self._log = folder / f"{name}.log"
        self._args = ["--host", host, *serve_args]
        self._started = threading.Event()
        self._child: Child | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._keep, name=f"keep-{name}", daemon=True).start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    def _keep(self) -> None:
        """Start the server and wait for it: this thread's end is the kernel's cue to stop
        it (PR_SET_PDEATHSIG), so it must outlive the server."""
        try:
            self._child = launch.start_serve(
                self.name, self._args, self._ready_file, log=self._log, die_with_parent=True
            )
        except BaseException as e:  # the constructor re-raises it in the caller's thread
            self._error = e
            return
        finally:
            self._started.set()
        self._child.proc.wait()

    @property
    def child(self) -> Child:
        assert self._child is not None, "set before the constructor returns"
        return self._child

    def where(self) -> dict[str, Any]:
        """This node (its Ray node id inside an actor, else None; its host name), the
        address the server binds, the server's pid."""
        node_id = None
        try:
            import ray

            if ray.is_initialized():
                node_id = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return {
            "node_id": node_id,
            "hostname": socket.gethostname(),
            "host": self.host,
            "pid": self.child.pid,
        }

    def ready(self, timeout_s: float) -> dict[str, Any]:
        """The server's ready file once written, or {"error": ..., "tail": ...} if it
        exits first or the time runs out."""
        try:
            launch.wait_ready([self.child], timeout_s=timeout_s)
        except ReadyError as e:
            return {"error": str(e), "tail": self.child.tail()}
        return self.child.served.as_dict()

    def watch(self) -> int:
        """Block until the server exits; its exit status."""
        return self.child.proc.wait()

    def status(self) -> int | None:
        """The server's exit status, or None while it runs."""
        return self.child.proc.poll()

    def signal(self, signum: int) -> int:
        """Send the server `signum` (a fault: kill, pause, resume); its pid. Raises
        ProcessLookupError if it is gone."""
        os.kill(self.child.pid, signum)
        return self.child.pid

    def tail(self) -> str:
        return self.child.tail()

    def stop(self, timeout_s: float) -> bool:
        """SIGTERM the server, SIGKILL it after `timeout_s`; True if it had to be killed."""
        killed: list[Child] = []
        launch.stop([self.child], timeout_s=timeout_s, on_kill=killed.append)
        return bool(killed)


def _node_address() -> str:
    """The address this actor's node registered with the cluster (`ray start
    --node-ip-address`; the one the others reach it at)."""
    import ray  # only inside a Ray actor

    node_id = ray.get_runtime_context().get_node_id()
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
