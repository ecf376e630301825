"""A streamed call's chunks written from the engine's own step: one task wake-up a request.

Read with `next_event`, every message wakes the request's handler task, resumes it
through its `await`s and goes through the HTTP library's async write. Where the engine
stream takes a sink (`EventStream.attach`; the live engine's does), `SseSink` receives
each group synchronously as the engine hands it over, formats its chunk with the same
`Reply` methods the task path uses (so the bytes are the same) and writes it at once
through a `WriteNow`, which says False when it cannot without waiting (the transport is
paused for flow control, or closing). Then the chunk queues, every later one queues
behind it, and the handler task writes them in order with the awaited `write`, which
drains or raises as the task path's would. The handler task itself only waits for the
stream's end.

No HTTP here: the front passes both writes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from memorywall.errors import MemorywallError
from memorywall.server.engine.api import Finished, TokenGroup
from memorywall.server.fronts.openai_reply import Reply, final_events

Write = Callable[[bytes], Awaitable[Any]]
# Writes the bytes now and says True, or says False (and writes nothing) when the
# transport would make the writer wait: paused for flow control, or closing.
WriteNow = Callable[[bytes], bool]


class SseSink:
    """One choice's chunks, written as the engine hands its groups over (`StreamSink`).

    A stop string that ends the text ends the chunks there (usage, [DONE]) and wakes the
    handler task, which aborts the engine request: a sink, called inside the engine's
    step, must not. Whatever the engine hands over until then is dropped.
    """

    def __init__(self, reply: Reply, write_now: WriteNow) -> None:
        self._reply = reply
        self._write_now = write_now
        self._opening = reply.role_event() if reply.chat else b""
        self._queued: deque[bytes] = deque()  # chunks for the handler task to write
        self._over = False  # the stream's last chunk is written or queued
        self._failure: Exception | None = None  # what went wrong inside a call from the engine
        self._waiter: asyncio.Future[None] | None = None  # the handler task, while it waits

    def group(self, group: TokenGroup) -> None:
        if self._over:
            return
        reply = self._reply
        try:
            chunk = reply.group_event(group)
            if self._opening:
                chunk, self._opening = self._opening + chunk, b""
            self._out(chunk)
            if reply.stopped:  # a stop string ended the text: the rest is moot
                self._out(final_events([reply], [reply.stopped_finished()]))
                self._over = True
                self._wake()
        except Exception as e:  # never into the engine's step: the handler task raises it
            self._fail(e)

    def end(self, final: Finished | None, error: MemorywallError | None) -> None:
        if self._over:
            return
        try:
            reply = self._reply
            if error is not None:  # the server drained before the request finished
                self._out(reply.error_events(error))
            else:
                assert final is not None, "a stream ends with its Finished or an error"
                self._out(reply.finish_event(final))
                self._out(final_events([reply], [final]))
        except Exception as e:
            self._fail(e)
            return
        self._over = True
        self._wake()

    def _out(self, chunk: bytes) -> None:
        if not chunk:
            return  # the awaited write sends nothing for no bytes either
        if self._queued or not self._write_now(chunk):
            self._queued.append(chunk)
            self._wake()

    def _fail(self, error: Exception) -> None:
        self._failure, self._over = error, True
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self, write: Write) -> None:
        """The handler task's part, once the sink is attached: write what queued, in order,
        until the stream is over. A cancellation (the client left) goes straight through."""
        queued = self._queued
        while True:
            while queued:
                # Written before it leaves the queue: what the engine hands over meanwhile
                # sees a queue and lines up behind it.
                await write(queued[0])
                queued.popleft()
            if self._failure is not None:
                raise self._failure
            if self._over:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
