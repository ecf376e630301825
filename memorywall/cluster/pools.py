"""One shape for "run these picklable calls elsewhere": a process pool or a Ray cluster.

A `Pool` has `submit(fn, *args)`, returning a `concurrent.futures.Future`, and `width`, the
calls it runs at once. `process_pool(jobs)` is `jobs` spawned processes on this host;
`ray_pool(address)` is one Ray task per call (one CPU each) on the cluster at `address`
(`auto`: the one this host belongs to), its width the cluster's CPUs. Leaving either's
`with` block cancels what is still queued or running.
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol

from memorywall.errors import ConfigError

RAY_EXTRA = "pip install 'memorywall[ray]'"


class Pool(Protocol):
    """Where submitted calls run; `width` of them at once."""

    width: int

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future: ...


class _Processes:
    def __init__(self, executor: ProcessPoolExecutor, width: int) -> None:
        self._executor, self.width = executor, width

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future:
        return self._executor.submit(fn, *args)


@contextmanager
def process_pool(jobs: int) -> Iterator[Pool]:
    """`jobs` processes on this host; spawned, not forked, so a child starts clean instead of
    inheriting this process's threads."""
    executor = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield _Processes(executor, jobs)
    finally:
        executor.shutdown(cancel_futures=True)


def import_ray() -> Any:
    """The `ray` module, or a one-line ConfigError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--ray: ray is not installed ({RAY_EXTRA})") from None
    return ray


@contextmanager
def connected(address: str) -> Iterator[Any]:
    """This process as a driver of the Ray cluster at `address` for the block: yields `ray`.
    Ray's own log lines stay in the cluster's log files (it names each worker's output)."""
    ray = import_ray()
    _reachable(address)
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--ray {address}: cannot join the cluster: {first}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT address answers a TCP connection (ray.init retries one that does not
    for minutes)."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"--ray {address}: cannot join the cluster: {e}") from None


class _RayTasks:
    def __init__(self, ray: Any, width: int) -> None:
        self._ray, self.width = ray, width
        self._remote: dict[Callable[..., Any], Any] = {}
        self._refs: list[Any] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self._ray.remote(num_cpus=1, max_retries=0)(fn)
        ref = remote.remote(*args)
        self._refs.append(ref)
        return ref.future()

    def cancel_all(self) -> None:
        """Cancel every task not finished: a search the waves no longer need, or all of them
        after a Ctrl-C."""
        ready, _ = self._ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
        done = set(ready)
        for ref in self._refs:
            if ref not in done:
                self._ray.cancel(ref, force=True)


@contextmanager
def ray_pool(address: str) -> Iterator[Pool]:
    """One Ray task per call on the cluster at `address`, as many at once as it has CPUs."""
    with connected(address) as ray:
        tasks = _RayTasks(ray, max(1, int(ray.cluster_resources().get("CPU", 1))))
        try:
            yield tasks
        finally:
            tasks.cancel_all()
