"""The channel between the engine process and a front process: framed, batched, pickled.

One Unix stream socket per front (a `socketpair` made by the parent before it
starts either process). Each frame is a 4-byte big-endian length and a pickled
list of messages, so a whole engine step's worth of token groups for one front
crosses in one write and one read. Why this channel: both ends are asyncio
loops, and a stream socket joins them without threads (multiprocessing's
`Connection` blocks); pickle is the fastest serializer in the standard library
for tuples of ints, floats and strings, and both ends are the same program on
the same machine, started by the same parent, so nothing untrusted is unpickled;
a socketpair has no path in the file system for another user to reach, and ZeroMQ
would add a dependency for what one socket per front does.

Messages are tuples whose first item is a `Kind`. Token groups travel as plain
tuples (`group_tuple` / `group_from`): cheaper to pickle than the dataclass.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import struct
from enum import IntEnum

from memorywall.errors import MemorywallError
from memorywall.server.engine.api import FinishReason, TokenGroup

_LENGTH = struct.Struct(">I")
MAX_FRAME_BYTES = 1 << 30


class Kind(IntEnum):
    # front -> engine
    SUBMIT = 1  # (key, Request, min_interval_s, arrival_s)
    CLOSE = 2  # (key): the front stopped reading a stream; abort it unless it ended
    ABORT_ID = 3  # (request_id): an Abort RPC for a request this front does not hold
    KV_EVENTS = 4  # (on): send prefix-cache events to this front, or stop
    METRICS = 5  # (token): render /metrics and answer with the same token
    GUARD_FAULT = 6  # (fault kind value): the front's guard injected a fault
    GUARD_REJECTED = 7  # (reason): the front's guard refused a request
    DRAIN = 8  # (): stop admitting, finish or end every stream, then answer DRAINED
    RELEASE_KV = 9  # (request_id): free what a finished `keep_kv` request kept
    LIFECYCLE = 10  # (token, op, arg): "sleep" (level), "wake_up", "reset_prefix_cache"
    # engine -> front
    HELLO = 20  # (ModelCard, EngineStats, block size, LifecycleState)
    GROUP = 21  # (key, *group_tuple)
    FINISHED = 22  # (key, Finished)
    ERROR = 23  # (key, error class, message)
    STATS = 24  # (EngineStats)
    KV_EVENT = 25  # (KVEvent)
    METRICS_BODY = 26  # (token, body, content type)
    DRAINING = 27  # (): the engine stopped admitting
    DRAINED = 28  # (): every stream has ended
    WAITING = 29  # (count): the queue's length changed (the fronts' admission reads it)
    LIFECYCLE_DONE = 30  # (token, result, error class or None, message)
    LIFECYCLE_STATE = 31  # (LifecycleState): loaded, asleep or awake now


def group_tuple(key: int, g: TokenGroup) -> tuple:
    reason = g.finish_reason.value if g.finish_reason is not None else None
    return (
        Kind.GROUP,
        key,
        g.token_ids,
        g.text,
        g.times_s,
        g.prompt_tokens,
        g.cached_tokens,
        g.completion_tokens,
        reason,
    )


def group_from(m: tuple) -> TokenGroup:
    reason = FinishReason(m[8]) if m[8] is not None else None
    return TokenGroup(m[2], m[3], m[4], m[5], m[6], m[7], reason)


def error_message(key: int, error: MemorywallError) -> tuple:
    """An engine error as class and text: some error classes take keyword-only fields and
    do not round-trip through pickle, and the engine only raises those that take a message."""
    return (Kind.ERROR, key, type(error), str(error))


def error_from(m: tuple) -> MemorywallError:
    cls, text = m[2], m[3]
    return cls(text) if issubclass(cls, MemorywallError) else MemorywallError(text)


def encode(messages: list[tuple]) -> bytes:
    body = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> list[tuple] | None:
    """The next frame's messages; None once the other end has closed."""
    try:
        header = await reader.readexactly(_LENGTH.size)
        (size,) = _LENGTH.unpack(header)
        if size > MAX_FRAME_BYTES:
            raise ConnectionError(f"frame of {size:,} bytes: the channel is out of step")
        return pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):  # closed, reset, or a broken pipe
        return None


class Outbox:
    """Messages to one peer, written as one frame per event-loop turn: whatever the loop
    produced in that turn (one engine step's tokens for this front) goes in one write."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._messages: list[tuple] = []
        self._loop = asyncio.get_running_loop()

    def put(self, message: tuple) -> None:
        if not self._messages:
            self._loop.call_soon(self.flush)
        self._messages.append(message)

    def flush(self) -> None:
        messages, self._messages = self._messages, []
        if messages and not self._writer.is_closing():
            self._writer.write(encode(messages))

    async def close(self) -> None:
        self.flush()
        if not self._writer.is_closing():
            self._writer.close()
        with contextlib.suppress(ConnectionError, BrokenPipeError):
            await self._writer.wait_closed()
