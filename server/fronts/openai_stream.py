"""Reading a call's engine streams, one per choice, into SSE writes or one response body.

No HTTP here: the front passes a `write` for the bytes. A choice whose text a stop
string ended has its engine request aborted at once (its slot and KV freed); its
later events are skipped, and its `Finished` still closes it. With `n` > 1 the
choices' events interleave as the engine hands them over.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from memorywall.errors import MemorywallError
from memorywall.server.engine.api import Event, EventStream, Finished
from memorywall.server.fronts.openai_reply import Piece, Reply, final_events, response_body

Write = Callable[[bytes], Awaitable[Any]]


async def merged(streams: Sequence[EventStream]) -> AsyncIterator[tuple[int, Event]]:
    """Every stream's events as they come, each with its stream's index; an engine error
    (the server drained) is raised."""
    if len(streams) == 1:  # the common case: no tasks, no queue
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event | MemorywallError | None]] = asyncio.Queue()

    async def pump(i: int, stream: EventStream) -> None:
        try:
            async for event in stream:
                queue.put_nowait((i, event))
        except MemorywallError as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, event = await queue.get()
            if event is None:
                left -= 1
            elif isinstance(event, MemorywallError):
                raise event
            else:
                yield i, event
    finally:
        for task in tasks:
            task.cancel()


async def stream_events(streams: Sequence[EventStream], replies: list[Reply], write: Write) -> None:
    """Write every choice's chunks as its tokens come, then usage if asked and [DONE]."""
    openings = [r.role_event() if r.chat else b"" for r in replies]
    finals: list[Finished | None] = [None] * len(replies)
    try:
        async for i, event in merged(streams):
            reply = replies[i]
            if isinstance(event, Finished):
                finals[i] = event
                await write(reply.finish_event(event))
                continue
            if reply.stopped:
                continue
            await write(openings[i] + reply.group_event(event))
            openings[i] = b""
            if reply.stopped:
                streams[i].close()
    except MemorywallError as e:  # the server drained before the request finished
        await write(replies[0].error_events(e))
        return
    await write(final_events(replies, finals))


async def response(streams: Sequence[EventStream], replies: list[Reply]) -> dict[str, Any]:
    """The whole non-streaming response once every choice has finished."""
    pieces: list[list[Piece]] = [[] for _ in replies]
    finals: list[Finished | None] = [None] * len(replies)
    async for i, event in merged(streams):
        reply = replies[i]
        if isinstance(event, Finished):
            finals[i] = event
        elif not reply.stopped:
            pieces[i].append(reply.take(event))
            if reply.stopped:
                streams[i].close()
    return response_body(replies, pieces, finals)
