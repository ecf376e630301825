"""`memorywall fleet SPEC --ray ADDRESS`: each worker a Ray actor on a node of the cluster.

Each worker's actor (`host.WorkerHost`) starts and supervises its `memorywall serve` on
its node, bound to the node's address: spread over the nodes by default, or pinned with
the worker's `node = "<resource>"` (a custom resource the node was started with, `ray
start --resources '{"<resource>": N}'`; each worker takes a thousandth of one). The gateway
(smg) runs where this command runs (the head, or any node: it reaches the workers by
their nodes' addresses); the ready file names each worker's `node` (its Ray node id).
Faults (kill, pause, resume) go through the actors. A worker whose actor is gone (its
node lost, its processes killed) is reported at once, marked `"alive": false` in the ready
file, and the fleet goes on with the rest; its node is reported lost once the cluster's
health checks find it dead; a server that exits unplanned stops the fleet, as a
local one does. SIGINT or SIGTERM stops every server through its actor, then the actors.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from memorywall.cluster.host import WorkerHost
from memorywall.cluster.pools import connected
from memorywall.fleet.runner import Fleet, serve_args
from memorywall.fleet.runner import run as run_fleet
from memorywall.fleet.spec import FleetSpec
from memorywall.ready import ServerReady, write_json

__all__ = ["RayFleet", "run"]

# A pinned worker takes this share of its node's custom resource: a thousand per node.
PIN_SHARE = 0.001
CALL_TIMEOUT_S = 30.0  # an actor call that takes longer is an actor lost


class RayFleet(Fleet):
    """A `Fleet` whose workers are Ray actors (`ray`, a connected `ray` module); the
    gateway stays a child of this process."""

    def __init__(self, spec: FleetSpec, log_dir: Path, *, ray: Any, **kwargs: Any) -> None:
        super().__init__(spec, log_dir, **kwargs)
        self._ray = ray
        self.actors: dict[str, Any] = {}
        self.placed: dict[str, dict[str, Any]] = {}  # each worker's `WorkerHost.where`
        self.lost: set[str] = set()  # workers whose actor died
        self._watches: dict[Any, str] = {}  # an outstanding `watch` call: its worker
        self._by_pid: dict[int, str] = {}
        self._unconfirmed: dict[str, list[str]] = {}  # lost workers by a node not yet dead
        self._next_confirm = 0.0

    def _start_workers(self) -> None:
        host = self._ray.remote(WorkerHost)
        for w in self.spec.workers:
            # num_cpus=0: a server is mostly idle between requests; threads: `watch` blocks.
            options: dict[str, Any] = {"num_cpus": 0, "max_concurrency": 4, "max_restarts": 0}
            if w.node is not None:
                options["resources"] = {w.node: PIN_SHARE}
            else:
                options["scheduling_strategy"] = "SPREAD"
            args = serve_args(w, self.spec.tls)
            self.actors[w.name] = host.options(**options).remote(w.name, args, str(self.log_dir))

    def _wait_for_workers(self) -> dict[str, ServerReady] | None:
        ray = self._ray
        calls = {n: a.ready.remote(self.startup_timeout_s) for n, a in self.actors.items()}
        pending = list(calls.values())
        # The servers' own startup time, and as long again for Ray to place and start actors.
        deadline = time.monotonic() + 2 * self.startup_timeout_s
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
            if self.stop.is_set():
                return None
            if time.monotonic() > deadline:
                late = [n for n, c in calls.items() if c in pending]
                pins = {w.name: w.node for w in self.spec.workers if w.node is not None}
                hint = "; ".join(
                    f"{n} wants a node with resource {pins[n]!r}" for n in late if n in pins
                )
                self.say(
                    f"memorywall fleet: {', '.join(late)} not started within "
                    f"{2 * self.startup_timeout_s:g} s on the cluster"
                    + (f" ({hint})" if hint else "")
                )
                return None
        workers = {}
        for name, call in calls.items():
            try:
                data = ray.get(call)
                self.placed[name] = ray.get(self.actors[name].where.remote())
            except ray.exceptions.RayError as e:
                self.say(f"memorywall fleet: {name}'s actor failed: {_first_line(e)}")
                return None
            if "error" in data:
                self.say(f"memorywall fleet: {name}: {data['error']}; its log:\n{data['tail']}")
                return None
            workers[name] = ServerReady.from_dict(data, f"{name}'s ready file")
            self._by_pid[workers[name].pid] = name
            self._watches[self.actors[name].watch.remote()] = name
        for name, where in self.placed.items():
            self.say(f"{name}: node {where['node_id']} ({where['hostname']}, {where['host']})")
        return workers

    def _nodes(self) -> dict[str, str]:
        return {name: where["node_id"] for name, where in self.placed.items()}

    def _signal(self, pid: int, signum: int) -> None:
        ray = self._ray
        try:
            ray.get(self.actors[self._by_pid[pid]].signal.remote(signum), timeout=CALL_TIMEOUT_S)
        except ray.exceptions.RayError as e:  # the server gone, or its actor
            raise ProcessLookupError(_first_line(e)) from None

    def _check(self) -> int | None:
        if (status := super()._check()) is not None:  # the gateway
            return status
        ray = self._ray
        if not self._watches:
            return None
        done, _ = ray.wait(list(self._watches), num_returns=len(self._watches), timeout=0)
        for call in done:
            name = self._watches.pop(call)
            try:
                code = ray.get(call)
            except ray.exceptions.RayError as e:
                self._lose(name, e)
                continue
            if name not in self.faults.killed:
                tail = ray.get(self.actors[name].tail.remote(), timeout=CALL_TIMEOUT_S)
                self.say(
                    f"memorywall fleet: {name} exited early (status {code}); last lines of "
                    f"its log on node {self.placed[name]['node_id']}:\n{tail}"
                )
                return 1
        self._confirm_nodes()
        if self.lost and self.lost == set(self.actors):
            self.say("memorywall fleet: every worker is lost")
            return 1
        return None

    def _lose(self, name: str, error: Exception) -> None:
        """Report a worker whose actor is gone, and mark it dead in the ready file; its
        node is reported lost once the cluster says so (`_confirm_nodes`)."""
        self.lost.add(name)
        node = self.placed[name]["node_id"]
        self._unconfirmed.setdefault(node, []).append(name)
        self.say(
            f"memorywall fleet: {name} is dead: its actor is gone (node {node}): "
            f"{_first_line(error)}"
        )
        if self.ready is not None and self.ready_file is not None:
            doc = self.ready.as_dict()
            for w in doc["workers"]:
                if w["name"] in self.lost:
                    w["alive"] = False
            write_json(self.ready_file, doc)

    def _confirm_nodes(self) -> None:
        """Say which nodes of lost workers the cluster has since found dead (it takes its
        health checks' time); asked at most once a second."""
        now = time.monotonic()
        if not self._unconfirmed or now < self._next_confirm:
            return
        self._next_confirm = now + 1.0
        alive = {n["NodeID"]: n["Alive"] for n in self._ray.nodes()}
        for node in [n for n in self._unconfirmed if not alive.get(n, False)]:
            names = ", ".join(self._unconfirmed.pop(node))
            self.say(f"memorywall fleet: node {node} is lost (its workers: {names})")

    def shutdown(self) -> None:
        """The gateway first (`Fleet.shutdown`), then every server through its actor, then
        the actors (a server still up then gets SIGTERM from the kernel)."""
        super().shutdown()
        ray = self._ray
        stops = [
            a.stop.remote(self.stop_timeout_s) for n, a in self.actors.items() if n not in self.lost
        ]
        deadline = time.monotonic() + self.stop_timeout_s + CALL_TIMEOUT_S
        while stops and time.monotonic() < deadline:
            _, stops = ray.wait(stops, num_returns=len(stops), timeout=0.5)
        for actor in self.actors.values():
            ray.kill(actor, no_restart=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def run(spec: FleetSpec, log_dir: Path | None, address: str, **kwargs: Any) -> int:
    """`memorywall.fleet.runner.run` with the workers on the Ray cluster at `address`."""
    with connected(address) as ray:

        def make(spec: FleetSpec, log_dir: Path, **kw: Any) -> RayFleet:
            return RayFleet(spec, log_dir, ray=ray, **kw)

        return run_fleet(spec, log_dir, make=make, **kwargs)
