"""Releasing requests on schedule and recording what comes back.

Closed loop: a fixed number of users, each sending its next request when the
last one finishes. Open loop: each request leaves at its precomputed offset
from a shared start time (optionally capped at a maximum concurrency); the
record keeps both the scheduled and the actual send time, so latency can be
measured from either. Several worker processes can share one plan: they
agree on the start time through the machine's monotonic clock.

Multi-turn sessions (`loadgen/sessions.py`): a turn is sent its `delay_s` after the
previous turn of its session ends. Closed loop: a user runs a whole session before
taking the next. Open loop: a session's first turn leaves at its offset; every turn
takes a slot of the cap on its own. Workers are dealt whole sessions.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from memorywall.loadgen import sessions
from memorywall.loadgen.arrivals import split_for_workers
from memorywall.loadgen.plan import LoadPlan
from memorywall.loadgen.records import RequestRecord, RequestSpec
from memorywall.loadgen.target import Target, TargetConfig, make_target

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized

START_LEAD_S = 1.0  # workers need this long to start before the shared start time
# Workers elsewhere (`run_workers_on`: a Ray cluster) start a process each, import, connect.
REMOTE_START_LEAD_S = 10.0


@dataclass(frozen=True)
class WorkerResult:
    records: list[RequestRecord]
    cpu_s: float  # this process's CPU time during the measured run
    wall_s: float


async def run_plan(
    target: Target,
    plan: LoadPlan,
    *,
    start_ns: int | None = None,
    worker: int = 0,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> WorkerResult:
    """Run `plan` against `target` from this event loop."""
    await target.connect()
    records: list[RequestRecord] = []
    for spec in plan.warmup:
        record = _record(spec, None, worker, warmup=True)
        records.append(record)  # kept, marked: metrics count them and leave them out
        await target.send(spec, record)
    if start_ns is None:
        start_ns = time.perf_counter_ns()
    await _sleep_until_ns(start_ns)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    stop_ns = start_ns + int(plan.duration_s * 1e9) if plan.duration_s else None

    async def one(spec: RequestSpec, scheduled_ns: int | None) -> None:
        record = _record(spec, scheduled_ns, worker)
        records.append(record)
        await target.send(spec, record)
        if on_done:
            on_done(record)

    if sessions.has_sessions(plan.specs):
        await _sessions(plan, start_ns, stop_ns, one)
    elif plan.open_loop:
        await _open_loop(plan, start_ns, stop_ns, one)
    else:
        await _closed_loop(plan, stop_ns, one)
    return WorkerResult(records, time.process_time() - cpu0, time.perf_counter() - wall0)


async def _closed_loop(plan: LoadPlan, stop_ns: int | None, one) -> None:
    queue = iter(plan.specs)

    async def user() -> None:
        for spec in queue:
            if stop_ns is not None and time.perf_counter_ns() >= stop_ns:
                return
            await one(spec, None)

    await asyncio.gather(*(user() for _ in range(plan.concurrency or 1)))


async def _open_loop(plan: LoadPlan, start_ns: int, stop_ns: int | None, one) -> None:
    cap = asyncio.Semaphore(plan.concurrency) if plan.concurrency else None
    tasks = []

    async def capped(cap: asyncio.Semaphore, spec: RequestSpec, scheduled_ns: int) -> None:
        async with cap:
            await one(spec, scheduled_ns)

    for spec in sorted(plan.specs, key=lambda s: s.due_s):
        scheduled_ns = start_ns + int(spec.due_s * 1e9)
        if stop_ns is not None and scheduled_ns >= stop_ns:
            break
        await _sleep_until_ns(scheduled_ns)
        run = capped(cap, spec, scheduled_ns) if cap else one(spec, scheduled_ns)
        tasks.append(asyncio.create_task(run))
    await asyncio.gather(*tasks)


async def _sessions(plan: LoadPlan, start_ns: int, stop_ns: int | None, one) -> None:
    """Sessions of turns, each turn `delay_s` after its previous turn ended."""
    cap = asyncio.Semaphore(plan.concurrency) if plan.open_loop and plan.concurrency else None

    async def session(chain: list[RequestSpec], first_ns: int | None) -> bool:
        """Run a session's turns; False once the run's duration is over."""
        for k, spec in enumerate(chain):
            due_ns = first_ns if k == 0 else time.perf_counter_ns() + int(spec.delay_s * 1e9)
            if due_ns is not None:
                if stop_ns is not None and due_ns >= stop_ns:
                    return False
                await _sleep_until_ns(due_ns)
            elif stop_ns is not None and time.perf_counter_ns() >= stop_ns:
                return False
            scheduled = due_ns if plan.open_loop else None
            if cap:
                async with cap:
                    await one(spec, scheduled)
            else:
                await one(spec, scheduled)
        return True

    chains = sessions.chains(plan.specs)
    if plan.open_loop:
        await asyncio.gather(*(session(c, start_ns + int(c[0].due_s * 1e9)) for c in chains))
        return
    queue = iter(chains)

    async def user() -> None:
        for chain in queue:
            if not await session(chain, None):
                return

    await asyncio.gather(*(user() for _ in range(plan.concurrency or 1)))


async def _sleep_until_ns(deadline_ns: int) -> None:
    """Absolute-deadline sleep; the loop may wake up to a millisecond late, which records keep."""
    delay = (deadline_ns - time.perf_counter_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


def _record(spec: RequestSpec, scheduled_ns: int | None, worker: int, warmup: bool = False):
    return RequestRecord(
        index=spec.index,
        prompt_tokens=spec.prompt_tokens,
        output_tokens=spec.output_tokens,
        scheduled_ns=scheduled_ns,
        sent_ns=0,
        warmup=warmup,
        worker=worker,
    )


# Worker processes ---------------------------------------------------------------------


def split_plan(plan: LoadPlan, workers: int) -> list[LoadPlan]:
    """Deal specs round-robin (open-loop offsets stay absolute); share users and the cap."""
    if plan.concurrency or not plan.open_loop:
        # Each worker needs at least one user (closed loop) or one slot of the cap (open loop).
        workers = min(workers, plan.concurrency or 1)
    if sessions.has_sessions(plan.specs):  # whole sessions: a turn follows its last turn
        dealt = split_for_workers(sessions.chains(plan.specs), workers)
        specs = [[s for chain in part for s in chain] for part in dealt]
    else:
        specs = split_for_workers(plan.specs, workers)
    warmup = split_for_workers(plan.warmup, workers) if plan.warmup else [[]] * workers
    parts = []
    for w in range(workers):
        users = None
        if plan.concurrency:
            users = plan.concurrency // workers + (1 if w < plan.concurrency % workers else 0)
        part = replace(plan, specs=tuple(specs[w]), warmup=tuple(warmup[w]), concurrency=users)
        parts.append(part)
    return [p for p in parts if p.specs and (p.concurrency is None or p.concurrency > 0)]


# Requests finished across worker processes, for the progress line (set in each worker).
_progress: Synchronized[int] | None = None


def _init_worker(counter: Synchronized[int]) -> None:
    global _progress
    _progress = counter


def _worker_main(
    endpoint: TargetConfig, plan: LoadPlan, start_ns: int, worker: int
) -> WorkerResult:
    def done(_: RequestRecord) -> None:
        assert _progress is not None, "set by _init_worker in each worker process"
        with _progress.get_lock():
            _progress.value += 1

    async def main() -> WorkerResult:
        target = make_target(endpoint, timeout_s=plan.timeout_s)
        try:
            return await run_plan(target, plan, start_ns=start_ns, worker=worker, on_done=done)
        finally:
            await target.aclose()

    return asyncio.run(main())


def run_workers(
    endpoint: TargetConfig,
    plan: LoadPlan,
    workers: int,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[WorkerResult]:
    """Run `plan` split over `workers` processes, sharing one start time; merged in order."""
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("i", 0)
    parts = split_plan(plan, workers)
    start_ns = time.perf_counter_ns() + int(START_LEAD_S * 1e9)
    pool = ProcessPoolExecutor(
        len(parts), mp_context=ctx, initializer=_init_worker, initargs=(counter,)
    )
    with pool:
        futures = [
            pool.submit(_worker_main, endpoint, part, start_ns, w) for w, part in enumerate(parts)
        ]
        while wait(futures, timeout=0.5).not_done:
            if progress:
                progress(counter.value)
        return [f.result() for f in futures]


# Workers elsewhere ----------------------------------------------------------------------


class WorkerPool(Protocol):
    """Where `run_workers_on` runs its workers (`memorywall.cluster.pools`: Ray tasks), all
    at once: `width` at least the workers."""

    width: int

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Future: ...


def wall_offset_ns() -> int:
    """This host's wall clock less its `perf_counter_ns` clock: adding it turns a record's
    time into wall-clock ns, comparable across hosts whose clocks are synchronised (NTP)."""
    return time.time_ns() - time.perf_counter_ns()


def shift_records(records: list[RequestRecord], by_ns: int) -> None:
    """Move every client-side time of `records` by `by_ns` (onto another host's clock).
    `server_received_ns` is the server's clock and stays as it is."""
    for r in records:
        r.sent_ns += by_ns
        if r.scheduled_ns is not None:
            r.scheduled_ns += by_ns
        if r.finished_ns is not None:
            r.finished_ns += by_ns
        r.chunk_ns = [t + by_ns for t in r.chunk_ns]


def _remote_worker_main(
    endpoint: TargetConfig, plan: LoadPlan, start_wall_ns: int, worker: int
) -> tuple[WorkerResult, int]:
    """One worker on another host: starts at the shared wall-clock instant, on its own
    clock; returns its result and its `wall_offset_ns` so the caller can move its times."""
    offset = wall_offset_ns()

    async def main() -> WorkerResult:
        target = make_target(endpoint, timeout_s=plan.timeout_s)
        try:
            return await run_plan(target, plan, start_ns=start_wall_ns - offset, worker=worker)
        finally:
            await target.aclose()

    return asyncio.run(main()), offset


def run_workers_on(
    pool: WorkerPool,
    endpoint: TargetConfig,
    plan: LoadPlan,
    workers: int,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[WorkerResult]:
    """`run_workers` with each worker a task on `pool`, on any host: they share a start
    instant on the wall clock, and their records come back moved onto this process's
    clock (each by its host's wall-clock offset less this one's), merged in order as
    local workers' are. `progress` counts the requests of the workers done."""
    parts = split_plan(plan, workers)
    assert len(parts) <= pool.width, "the caller checks every worker can run at once"
    here = wall_offset_ns()
    start_wall_ns = time.time_ns() + int(REMOTE_START_LEAD_S * 1e9)
    futures = [
        pool.submit(_remote_worker_main, endpoint, part, start_wall_ns, w)
        for w, part in enumerate(parts)
    ]
    while wait(futures, timeout=0.5).not_done:
        if progress:
            progress(sum(len(p.specs) for p, f in zip(parts, futures, strict=True) if f.done()))
    results = []
    for future in futures:
        result, offset = future.result()
        shift_records(result.records, offset - here)
        results.append(result)
    return results


def run_single(
    endpoint: TargetConfig, plan: LoadPlan, *, progress: Callable[[int], None] | None = None
) -> WorkerResult:
    """Run `plan` from this process."""

    async def main() -> WorkerResult:
        target = make_target(endpoint, timeout_s=plan.timeout_s)
        done = 0

        def on_done(_: RequestRecord) -> None:
            nonlocal done
            done += 1

        async def report() -> None:
            while True:
                if progress:
                    progress(done)
                await asyncio.sleep(0.5)

        reporter = asyncio.create_task(report())
        try:
            return await run_plan(target, plan, on_done=on_done)
        finally:
            reporter.cancel()
            await target.aclose()

    return asyncio.run(main())


def progress_printer(total: int, label: str) -> Callable[[int], None]:
    """A one-line progress bar on stderr (only when stderr is a terminal)."""
    started = time.perf_counter()
    if not sys.stderr.isatty():
        return lambda done: None

    def show(done: int) -> None:
        width = 30
        filled = int(width * min(done, total) / max(total, 1))
        elapsed = time.perf_counter() - started
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(f"\r{label} [{bar}] {done}/{total} {elapsed:6.1f} s")
        sys.stderr.flush()

    return show
