"""Admission and injected faults around any `EngineClient`, as an `EngineClient` itself.

`memorywall serve` puts a `GuardedEngine` between the live engine and every
front: it bounds the waiting queue (`--max-waiting`: beyond it a request is
refused with `OverloadedError`) and gives each arriving request the fate its
`FaultPlan` draws (`faults.py`). An `error` fate refuses the request before
the engine sees it; the others wrap its stream:

- `abort`: hand over the first N tokens, then abort the request in the engine
  (its slot and KV are freed at once) and end the stream with the fault's error.
- `stall` / `slow`: retime every token. The engine runs the request as it runs
  any other; the wrapper shifts each modelled time by the stall and stretches
  each gap after the first token by the slowdown, so the delays still come from
  the core, then hands each group over at its new time. The request leaves the
  batch on its modelled schedule: the client sees a slow or stalled request,
  the other requests do not pay for it. A reader task takes the engine's groups
  as they come, so the engine's lag figures stay its own.

Requests with no fate get the engine's own stream, untouched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from memorywall.errors import ConfigError, InvalidRequestError, MemorywallError, OverloadedError
from memorywall.server.engine.api import (
    EngineClient,
    EngineStats,
    Event,
    EventIteration,
    EventStream,
    Finished,
    KVEvent,
    LifecycleState,
    Request,
    TokenGroup,
)
from memorywall.server.engine.clock import Clock
from memorywall.server.engine.faults import Fault, FaultKind, FaultPlan, FaultRule
from memorywall.server.engine.tokens import token_text


class GuardObserver(Protocol):
    """Counts what the guard does (`fronts/guard_metrics.py` exports it)."""

    def on_fault(self, kind: FaultKind) -> None: ...

    def on_rejected(self, reason: str) -> None: ...


@dataclass(frozen=True, kw_only=True)
class GuardConfig:
    max_waiting: int | None = None  # None: unbounded, as vLLM's queue
    retry_after_s: float = 1.0  # what a refused client is told to wait
    faults: tuple[FaultRule, ...] = ()
    fault_seed: int = 0
    allow_fault_headers: bool = False

    def __post_init__(self) -> None:
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ConfigError(f"max_waiting: must be >= 0, got {self.max_waiting}")
        if self.retry_after_s <= 0:
            raise ConfigError(f"retry_after_s: must be > 0, got {self.retry_after_s}")


class LoopClock:
    """The monotonic clock the live engine reads, with plain asyncio sleeps: many fault
    streams sleep at once, which the engine's single timerfd cannot serve."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, deadline_s: float) -> None:
        delay = deadline_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def close(self) -> None:
        pass


class GuardedEngine:
    """`EngineClient` that admits, refuses and injects faults in front of `inner`.

    `clock`: reads the same monotonic time as `inner.now()` and sleeps for fault streams.
    """

    def __init__(
        self,
        inner: EngineClient,
        config: GuardConfig,
        *,
        clock: Clock | None = None,
        observers: Iterable[GuardObserver] = (),
    ) -> None:
        self.inner = inner
        self.config = config
        self.plan = FaultPlan(config.faults, config.fault_seed)
        self.clock = clock or LoopClock()
        self._drawing = bool(config.faults) or config.allow_fault_headers
        self.observers = list(observers)

    @property
    def draining(self) -> bool:
        return self.inner.draining

    def now(self) -> float:
        return self.inner.now()

    def submit(
        self,
        request: Request,
        *,
        min_interval_s: float = 0.0,
        arrival_s: float | None = None,
        fault: FaultRule | None = None,
    ) -> EventStream:
        """Refuse (injected error, full queue), or submit and wrap the stream of a request
        whose fate changes its tokens. `fault`: the request's own rule (from its header)."""
        if fault is not None and not self.config.allow_fault_headers:
            raise InvalidRequestError(
                "x-memorywall-fault: per-request faults are off; start the server with "
                "--allow-fault-headers"
            )
        fate = self.plan.draw(fault) if self._drawing else None
        if fate is not None and fate.kind is FaultKind.ERROR:
            self._count(fate.kind)
            raise fate.error("request refused")
        limit = self.config.max_waiting
        if limit is not None and (n := self.inner.waiting()) >= limit:
            for observer in self.observers:
                observer.on_rejected("max_waiting")
            raise OverloadedError(
                f"server overloaded: {n} requests waiting (limit {limit}); retry later",
                retry_after_s=self.config.retry_after_s,
            )
        now = self.inner.now()
        stream = self.inner.submit(request, min_interval_s=min_interval_s, arrival_s=arrival_s)
        if fate is None:
            return stream
        if fate.kind is not FaultKind.ABORT:  # an abort counts when it cuts the stream
            self._count(fate.kind)
        arrival = now if arrival_s is None else min(arrival_s, now)
        return FaultStream(stream, fate, arrival_s=arrival, clock=self.clock, count=self._count)

    def abort(self, request_id: str) -> bool:
        return self.inner.abort(request_id)

    def release_kv(self, request_id: str) -> bool:
        return self.inner.release_kv(request_id)

    def stats(self) -> EngineStats:
        return self.inner.stats()

    def waiting(self) -> int:
        return self.inner.waiting()

    def subscribe_kv_events(self, callback: Callable[[KVEvent], None]) -> Callable[[], None]:
        return self.inner.subscribe_kv_events(callback)

    @property
    def lifecycle(self) -> LifecycleState:
        return self.inner.lifecycle

    async def sleep(self, level: int) -> None:
        await self.inner.sleep(level)

    async def wake_up(self) -> None:
        await self.inner.wake_up()

    async def reset_prefix_cache(self) -> bool:
        return await self.inner.reset_prefix_cache()

    async def drain(self, grace_s: float) -> None:
        await self.inner.drain(grace_s)

    def _count(self, kind: FaultKind) -> None:
        for observer in self.observers:
            observer.on_fault(kind)


class FaultStream(EventIteration):
    """A request's engine stream with its fault applied (see the module docstring)."""

    def __init__(
        self,
        inner: EventStream,
        fault: Fault,
        *,
        arrival_s: float,
        clock: Clock,
        count: Callable[[FaultKind], None],
    ) -> None:
        self._inner = inner
        self.request_id = inner.request_id
        self.fault = fault
        self._arrival_s = arrival_s
        self._clock = clock
        self._count = count
        self._sent = 0
        self._first_s: float | None = None  # the engine's modelled first-token time
        self._complete = False  # the engine's last group has been handed over
        self._events: asyncio.Queue[Event | MemorywallError | None] = asyncio.Queue()
        self._reader: asyncio.Task | None = None

    @property
    def ended(self) -> bool:
        return self._inner.ended

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._inner.close()

    async def _read_all(self) -> None:
        try:
            while (event := await self._inner.next_event()) is not None:
                self._events.put_nowait(event)
        except MemorywallError as e:  # drained: the error ends the stream in its turn
            self._events.put_nowait(e)
            return
        self._events.put_nowait(None)

    async def _next_inner(self) -> Event | None:
        """The engine's next event: read directly for a cut, through the reader task when
        retiming (the reader keeps pace with the engine while this stream waits)."""
        if self.fault.kind is FaultKind.ABORT:
            return await self._inner.next_event()
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_all(), name=f"fault-{self.request_id}")
        item = await self._events.get()
        if isinstance(item, MemorywallError):
            raise item
        return item

    async def next_event(self) -> Event | None:
        f = self.fault
        cutting = f.kind is FaultKind.ABORT and not self._complete
        if cutting and self._sent >= f.after_tokens:
            self._inner.close()  # frees the slot and KV now
            self._count(f.kind)
            raise f.error(f"stream aborted after {self._sent} tokens")
        event = await self._next_inner()
        if event is None:
            return None
        if isinstance(event, Finished):
            return self._finished(event)
        if cutting:
            group = self._cut(event, f.after_tokens - self._sent)
        else:
            group = self._retime(event)
            await self._clock.sleep_until(self._arrival_s + group.times_s[-1])
        self._sent += len(group.token_ids)
        self._complete = group.finish_reason is not None
        return group

    def _cut(self, group: TokenGroup, keep: int) -> TokenGroup:
        drop = len(group.token_ids) - keep
        if drop <= 0:
            return group
        return replace(
            group,
            token_ids=group.token_ids[:keep],
            text="".join(token_text(t) for t in group.token_ids[:keep]),
            times_s=group.times_s[:keep],
            completion_tokens=group.completion_tokens - drop,
            finish_reason=None,
        )

    def _retime(self, group: TokenGroup) -> TokenGroup:
        if self._first_s is None:
            self._first_s = group.times_s[0]
        first, f = self._first_s, self.fault
        times = tuple(f.stall_s + first + f.slowdown * (t - first) for t in group.times_s)
        return replace(group, times_s=times)

    def _finished(self, done: Finished) -> Finished:
        f = self.fault
        if f.kind is FaultKind.ABORT:  # the request ended before the cut
            return done
        ttft = done.ttft_s + f.stall_s
        decode = done.decode_s * f.slowdown
        return replace(
            done,
            prefill_s=done.prefill_s + f.stall_s,
            ttft_s=ttft,
            decode_s=decode,
            e2e_s=ttft + decode,
            fault=str(f),
        )
