"""A front process's `EngineClient`: the engine in another process, over `wire`.

What the fronts ask synchronously is answered here: `submit` checks what the
engine would refuse (from the model card the engine sent) and returns a stream
at once; `stats` come from the snapshot the engine pushes when they change
(every 0.1 s at most) and `waiting` from the count it sends whenever the queue
changes (the guard's `--max-waiting` reads it: other fronts' newest requests
count once the engine has them); `now` is CLOCK_MONOTONIC, which every process
on the machine shares, so arrival stamps made here mean the same in the
engine. A duplicate request id held by another front is only seen by the
engine: that stream ends with the engine's error as its first event. Emission
lag (`/metrics`, `GetServerInfo`, each request's `max_lag_s`) is measured when
the engine process hands a group to its socket; the hop to the front is not in it.

`abort` by request id aborts a stream of this front and answers True; for any
other id it asks the engine to abort it wherever it runs and answers False,
since it cannot know the outcome without waiting (a client's Abort normally
shares the connection, hence the front, of the stream it cancels).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from memorywall.errors import (
    DrainingError,
    DuplicateRequestError,
    MemorywallError,
)
from memorywall.server.engine.api import (
    EngineStats,
    Event,
    EventIteration,
    FaultKind,
    FaultRule,
    KVEvent,
    LifecycleState,
    ModelCard,
    Request,
    TokenGroup,
    check_request,
    check_serving,
)
from memorywall.server.engine.faults import refuse_fault
from memorywall.server.multi.wire import Kind, Outbox, error_from, group_from, read_frame

METRICS_TIMEOUT_S = 10.0


class EngineLostError(DrainingError):
    """The engine process went away; every stream of this front ends with it."""


class RemoteStream(EventIteration):
    """One request's events as the engine forwards them; see `api.EventStream`."""

    __slots__ = ("_done", "_engine", "_events", "_waiter", "ended", "key", "request_id")

    def __init__(self, engine: RemoteEngine, key: int, request_id: str) -> None:
        self._engine = engine
        self.key = key
        self.request_id = request_id
        self._events: deque[Event | MemorywallError] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False  # the reader has taken the last event
        self.ended = False  # the engine has finished or aborted it (or it was closed)

    def _put(self, event: Event | MemorywallError) -> None:
        if type(event) is not TokenGroup or event.finish_reason is not None:
            self.ended = True
        self._events.append(event)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def next_event(self) -> Event | None:
        events = self._events
        while not events:
            if self._done:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        event = events.popleft()
        if type(event) is TokenGroup:
            if events and type(events[0]) is TokenGroup:
                return _merged(event, events)  # a reader that fell behind takes them at once
            return event
        self._done = True
        if isinstance(event, MemorywallError):
            raise event
        return event

    def close(self) -> None:
        """The front stops reading: abort the request unless it has ended."""
        if not self.ended:
            self.ended = True
            self._engine._close(self)
        self._engine._forget(self)


def _merged(first: TokenGroup, queue: deque) -> TokenGroup:
    """`first` and the token groups queued after it, as one group (as the engine's own
    stream hands over everything released since the reader last came)."""
    groups = [first]
    while queue and type(queue[0]) is TokenGroup:
        groups.append(queue.popleft())
    last = groups[-1]
    return TokenGroup(
        token_ids=tuple(t for g in groups for t in g.token_ids),
        text="".join(g.text for g in groups),
        times_s=tuple(t for g in groups for t in g.times_s),
        prompt_tokens=last.prompt_tokens,
        cached_tokens=last.cached_tokens,
        completion_tokens=last.completion_tokens,
        finish_reason=last.finish_reason,
    )


class RemoteEngine:
    """`EngineClient` over one front's socket to the engine process. `await connect()` first.

    Also the front guard's observer: its fault and refusal counts go to the engine, whose
    /metrics counts every front's.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._out = Outbox(writer)
        self._streams: dict[int, RemoteStream] = {}
        self._by_id: dict[str, RemoteStream] = {}
        self._keys = itertools.count()
        self._kv_callbacks: list[Callable[[KVEvent], None]] = []
        self._metrics: dict[int, asyncio.Future[tuple[bytes, str]]] = {}
        self._lifecycle_calls: dict[int, asyncio.Future[object]] = {}
        self._lifecycle: LifecycleState | None = None
        self._draining = False
        self.drained = asyncio.Event()  # the engine has drained (asked by any front or itself)
        self.lost = asyncio.Event()  # the engine's socket closed
        self.card: ModelCard | None = None
        self.block_size = 0
        self._stats: EngineStats | None = None
        # The engine's queue as last heard, plus what this front submitted since.
        self._waiting = 0
        self._sent_since = 0
        self._task: asyncio.Task | None = None

    async def connect(self) -> ModelCard:
        """Wait for the engine's hello (the model card and first stats), then serve."""
        frame = await read_frame(self._reader)
        if not frame or frame[0][0] is not Kind.HELLO:
            raise ConnectionError("the engine process closed before it said hello")
        _, self.card, self._stats, self.block_size, self._lifecycle = frame[0]
        self._waiting = self._stats.waiting
        self._dispatch(frame[1:])
        self._task = asyncio.create_task(self._read(), name="memorywall-remote-engine")
        return self.card

    async def _read(self) -> None:
        try:
            while (messages := await read_frame(self._reader)) is not None:
                self._dispatch(messages)
        finally:
            self._lose()

    def _dispatch(self, messages: list[tuple]) -> None:
        streams = self._streams
        for m in messages:
            kind = m[0]
            if kind is Kind.GROUP:
                if (stream := streams.get(m[1])) is not None:
                    stream._put(group_from(m))
            elif kind is Kind.FINISHED:
                if (stream := streams.get(m[1])) is not None:
                    stream._put(m[2])
            elif kind is Kind.ERROR:
                if (stream := streams.get(m[1])) is not None:
                    stream._put(error_from(m))
            elif kind is Kind.WAITING:
                self._waiting, self._sent_since = m[1], 0
            elif kind is Kind.STATS:
                self._stats = m[1]
                self._waiting, self._sent_since = m[1].waiting, 0
            elif kind is Kind.KV_EVENT:
                for callback in list(self._kv_callbacks):
                    callback(m[1])
            elif kind is Kind.METRICS_BODY:
                future = self._metrics.pop(m[1], None)
                if future is not None and not future.done():
                    future.set_result((m[2], m[3]))
            elif kind is Kind.LIFECYCLE_STATE:
                self._lifecycle = m[1]
            elif kind is Kind.LIFECYCLE_DONE:
                call = self._lifecycle_calls.pop(m[1], None)
                if call is not None and not call.done():
                    if m[3] is None:
                        call.set_result(m[2])
                    else:
                        call.set_exception(error_from((Kind.ERROR, m[1], m[3], m[4])))
            elif kind is Kind.DRAINING:
                self._draining = True
            elif kind is Kind.DRAINED:
                self._draining = True
                self.drained.set()

    def _lose(self) -> None:
        """The engine is gone: end every stream with an error and let waiters go."""
        self._draining = True
        error = EngineLostError("the engine process exited; the request cannot finish")
        for stream in list(self._streams.values()):
            if not stream.ended:
                stream._put(error)
        waiters: list[asyncio.Future[Any]] = [
            *self._metrics.values(),
            *self._lifecycle_calls.values(),
        ]
        for future in waiters:
            if not future.done():
                future.set_exception(EngineLostError("the engine process exited"))
        self.drained.set()
        self.lost.set()

    # EngineClient

    @property
    def draining(self) -> bool:
        return self._draining

    def now(self) -> float:
        return time.monotonic()

    def submit(
        self,
        request: Request,
        *,
        min_interval_s: float = 0.0,
        arrival_s: float | None = None,
        fault: FaultRule | None = None,
    ) -> RemoteStream:
        """Refuses a `fault`: the front's guard applies them, in front of this engine."""
        refuse_fault(fault)
        if self._draining:
            raise DrainingError("server is shutting down; not admitting new requests")
        check_serving(self.lifecycle)
        rid = request.request_id
        if rid in self._by_id:
            raise DuplicateRequestError(f"request_id {rid!r} is already in flight")
        card = self.card
        assert card is not None, "connect() first"
        check_request(request, card.context_window, card.kv_capacity_tokens, self.block_size)
        key = next(self._keys)
        stream = RemoteStream(self, key, rid)
        self._streams[key] = stream
        self._by_id[rid] = stream
        self._sent_since += 1
        arrival = time.monotonic() if arrival_s is None else arrival_s
        self._out.put((Kind.SUBMIT, key, request, min_interval_s, arrival))
        return stream

    def release_kv(self, request_id: str) -> bool:
        """Sent to the engine, which frees the request's held KV; True once sent."""
        self._out.put((Kind.RELEASE_KV, request_id))
        return True

    def abort(self, request_id: str) -> bool:
        stream = self._by_id.get(request_id)
        if stream is None:
            self._out.put((Kind.ABORT_ID, request_id))
            return False
        if stream.ended:
            return False
        stream.ended = True
        self._close(stream)  # its reader gets the engine's Finished (reason abort)
        return True

    def stats(self) -> EngineStats:
        assert self._stats is not None, "connect() first"
        return self._stats

    def waiting(self) -> int:
        """The engine's queue as last heard (after each step that changed it), plus this
        front's requests since; other fronts' latest are not known yet."""
        return self._waiting + self._sent_since

    def subscribe_kv_events(self, callback: Callable[[KVEvent], None]) -> Callable[[], None]:
        if not self._kv_callbacks:
            self._out.put((Kind.KV_EVENTS, True))
        self._kv_callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._kv_callbacks:
                self._kv_callbacks.remove(callback)
                if not self._kv_callbacks:
                    self._out.put((Kind.KV_EVENTS, False))

        return unsubscribe

    async def drain(self, grace_s: float) -> None:
        """Ask the engine to drain (every front asks; it drains once) and wait until it has:
        the engine gives streams `grace_s`, this waits a little longer for its answer."""
        self._draining = True
        if not self.drained.is_set():
            self._out.put((Kind.DRAIN,))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drained.wait(), timeout=grace_s + 5.0)

    # Lifecycle: asked of the engine process, which answers this front and tells every front
    # its new state

    @property
    def lifecycle(self) -> LifecycleState:
        assert self._lifecycle is not None, "connect() first"  # the hello carries the state
        return self._lifecycle

    async def sleep(self, level: int) -> None:
        await self._lifecycle_call("sleep", level)

    async def wake_up(self) -> None:
        await self._lifecycle_call("wake_up", None)

    async def reset_prefix_cache(self) -> bool:
        return bool(await self._lifecycle_call("reset_prefix_cache", None))

    async def _lifecycle_call(self, op: str, arg: int | None) -> object:
        if self.lost.is_set():
            raise EngineLostError("the engine process exited")
        token = next(self._keys)
        future = asyncio.get_running_loop().create_future()
        self._lifecycle_calls[token] = future
        self._out.put((Kind.LIFECYCLE, token, op, arg))
        try:
            return await future
        finally:
            self._lifecycle_calls.pop(token, None)

    # What only the multi-process fronts use

    async def render_metrics(self) -> tuple[bytes, str]:
        """The engine's /metrics body and content type."""
        if self.lost.is_set():
            raise EngineLostError("the engine process exited")
        token = next(self._keys)
        future = asyncio.get_running_loop().create_future()
        self._metrics[token] = future
        self._out.put((Kind.METRICS, token))
        try:
            return await asyncio.wait_for(future, timeout=METRICS_TIMEOUT_S)
        finally:
            self._metrics.pop(token, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._out.close()

    # GuardObserver

    def on_fault(self, kind: FaultKind) -> None:
        self._out.put((Kind.GUARD_FAULT, kind.value))

    def on_rejected(self, reason: str) -> None:
        self._out.put((Kind.GUARD_REJECTED, reason))

    # RemoteStream's

    def _close(self, stream: RemoteStream) -> None:
        self._out.put((Kind.CLOSE, stream.key))

    def _forget(self, stream: RemoteStream) -> None:
        self._streams.pop(stream.key, None)
        if self._by_id.get(stream.request_id) is stream:
            del self._by_id[stream.request_id]
