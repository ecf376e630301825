"""Reading a call's engine streams, one per choice, into SSE writes or one response body.

No HTTP here: the front passes a `write` for the bytes, and a `write_now` where its
transport can take them synchronously: then a one-choice call the engine can hand over
synchronously is written from the engine's step (`openai_sink.py`). A choice whose text a
stop string ended has its engine request aborted at once (its slot and KV freed); its
later events are skipped, and its `Finished` still closes it. With `n` > 1 the
choices' events interleave as the engine hands them over.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from memorywall.errors import MemorywallError
from memorywall.server.engine.api import Event, EventStream, Finished
from memorywall.server.fronts.openai_reply import Piece, Reply, final_events, response_body
from memorywall.server.fronts.openai_sink import SseSink, Write, WriteNow


async def merged(streams: Sequence[EventStream]) -> AsyncGenerator[tuple[int, Event], None]:
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
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, MemorywallError):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def stream_events(
    streams: Sequence[EventStream],
    replies: list[Reply],
    write: Write,
    write_now: WriteNow | None = None,
) -> None:
    """Write every choice's chunks as its tokens come, then usage if asked and [DONE]."""
    if len(streams) == 1:
        reply = replies[0]
        if write_now is not None and streams[0].attach(sink := SseSink(reply, write_now)):
            await sink.run(write)
            if reply.stopped:
                streams[0].close()  # the engine request is not needed: free its slot and KV
            return
        await _stream_one(streams[0], reply, write)
        return
    openings = [r.role_event() if r.chat else b"" for r in replies]
    finals: list[Finished | None] = [None] * len(replies)
    try:
        async with contextlib.aclosing(merged(streams)) as events:
            async for i, event in events:
                reply = replies[i]
                if finals[i] is not None:
                    continue  # a stop string ended it: what the engine sent after is moot
                if isinstance(event, Finished):
                    finals[i] = event
                    await write(reply.finish_event(event))
                else:
                    await write(openings[i] + reply.group_event(event))
                    openings[i] = b""
                    if reply.stopped:
                        finals[i] = _stop(streams[i], reply)
                if all(f is not None for f in finals):
                    break
    except MemorywallError as e:  # the server drained before the request finished
        await write(replies[0].error_events(e))
        return
    await write(final_events(replies, _all_finished(finals)))


async def _stream_one(stream: EventStream, reply: Reply, write: Write) -> None:
    """`stream_events` for one choice (`n` = 1, nearly every call): the same writes, read
    straight from the engine's stream, with no generator between (one per message)."""
    opening = reply.role_event() if reply.chat else b""
    final: Finished | None = None
    try:
        while (event := await stream.next_event()) is not None:
            if isinstance(event, Finished):
                final = event
                await write(reply.finish_event(event))
                break
            await write(opening + reply.group_event(event) if opening else reply.group_event(event))
            opening = b""
            if reply.stopped:
                final = _stop(stream, reply)
                break
    except MemorywallError as e:  # the server drained before the request finished
        await write(reply.error_events(e))
        return
    await write(final_events([reply], _all_finished([final])))


async def response(streams: Sequence[EventStream], replies: list[Reply]) -> dict[str, Any]:
    """The whole non-streaming response once every choice has finished."""
    pieces: list[list[Piece]] = [[] for _ in replies]
    finals: list[Finished | None] = [None] * len(replies)
    async with contextlib.aclosing(merged(streams)) as events:
        async for i, event in events:
            reply = replies[i]
            if finals[i] is not None:
                continue
            if isinstance(event, Finished):
                finals[i] = event
            else:
                pieces[i].append(reply.take(event))
                if reply.stopped:
                    finals[i] = _stop(streams[i], reply)
            if all(f is not None for f in finals):
                break
    return response_body(replies, pieces, _all_finished(finals))


def _all_finished(finals: list[Finished | None]) -> list[Finished]:
    """Every choice's end, once the events are read: an engine stream ends with its
    `Finished` (or raises), and a choice a stop string ended got one from `_stop`."""
    done = [f for f in finals if f is not None]
    assert len(done) == len(finals), "an engine stream ended without its Finished"
    return done


def _stop(stream: EventStream, reply: Reply) -> Finished:
    """A stop string ended the choice: abort its request and end it here, without waiting
    for the engine's word (a closed stream may never give it)."""
    stream.close()
    return reply.stopped_finished()
