"""The rendezvous of a request's two halves, by bootstrap room, over loopback TCP.

A prefill worker serves it on its bootstrap port; a decode half connects, names
its room, and the two exchange one JSON object per line:

    decode  -> prefill  {"room": R, "request_id": ...}
    prefill -> decode   {"prefill": {end_s, prefill_s, tokens, deployment}}  once prefilled,
                        or {"error": "timeout" | "lost", "message": ...}
    decode  -> prefill  {"book": {start_s, size_bytes, send_bytes_per_s,
                                  receive_bytes_per_s, ingress: PORT}}
    prefill -> decode   {"booking": {start_s, end_s, segments: [[start_s, end_s, B/s]...]}}
    decode  -> prefill  {"transfer": {end_s, time_s, exposed_s, bytes}}
    decode  -> prefill  {"done": true}  when the KV has landed (at end_s)

Times are CLOCK_MONOTONIC seconds, one clock for every process on a host. The
connection stays open until the KV has landed, so a worker that dies (the
kernel closes its sockets) or a half that ends early shows up on the other side
as end of file: that half then ends UNAVAILABLE. Either half may come first; one
whose partner does not come within the timeout ends DEADLINE_EXCEEDED.

The transfer is booked on both ends of the link (`core.kv_transfer.book`): the
decode worker sends its ingress port (PORT: {after_s, segments}) while it holds
it for this booking, and the prefill worker books the transfer on that and its
own egress port, keeps the booking and answers with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from memorywall.core.kv_transfer import Booking, LinkPort, Segment, book
from memorywall.errors import DisaggregationError, InvalidRequestError, PartnerLostError
from memorywall.server.pd.config import DeploymentRef

MAX_LINE_BYTES = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class Prefilled:
    """What the decode half needs of a finished prefill."""

    end_s: float  # when the prefill step ended (CLOCK_MONOTONIC)
    prefill_s: float  # its prefill time, which a layer-by-layer transfer may overlap
    tokens: int  # prompt tokens whose KV moves
    deployment: DeploymentRef

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Prefilled:
        try:
            return cls(
                end_s=float(data["end_s"]),
                prefill_s=float(data["prefill_s"]),
                tokens=int(data["tokens"]),
                deployment=DeploymentRef.from_dict(data["deployment"]),
            )
        except (TypeError, KeyError, ValueError) as e:
            raise DisaggregationError(f"bad prefill message from the bootstrap server: {e}") from e


@dataclass(frozen=True, kw_only=True)
class TransferPlan:
    """The KV transfer as the decode worker timed it."""

    end_s: float  # when the KV has landed on the decode worker (CLOCK_MONOTONIC)
    time_s: float  # the whole transfer
    exposed_s: float  # its share of TTFT
    bytes: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> TransferPlan:
        return cls(**{k: float(data[k]) for k in ("end_s", "time_s", "exposed_s", "bytes")})


def port_as_dict(port: LinkPort) -> dict[str, Any]:
    after = None if math.isinf(port.after_s) else port.after_s
    return {"after_s": after, "segments": _segments_as_list(port.segments)}


def port_from_dict(data: Any) -> LinkPort:
    after = data["after_s"]
    return LinkPort(_segments(data["segments"]), after_s=-math.inf if after is None else after)


def booking_as_dict(b: Booking) -> dict[str, Any]:
    return {"start_s": b.start_s, "end_s": b.end_s, "segments": _segments_as_list(b.segments)}


def booking_from_dict(data: Any) -> Booking:
    return Booking(
        start_s=float(data["start_s"]),
        end_s=float(data["end_s"]),
        segments=tuple(_segments(data["segments"])),
    )


def _segments_as_list(segments: Any) -> list[list[float]]:
    return [[s.start_s, s.end_s, s.bytes_per_s] for s in segments]


def _segments(data: Any) -> list[Segment]:
    return [Segment(start_s=float(a), end_s=float(b), bytes_per_s=float(r)) for a, b, r in data]


def book_for(egress: LinkPort, ask: Any) -> Booking:
    """The prefill worker's side of a `book` message: the transfer placed on its egress and
    the decode worker's ingress as sent."""
    return book(
        egress,
        port_from_dict(ask["ingress"]),
        start_s=float(ask["start_s"]),
        size_bytes=float(ask["size_bytes"]),
        send_bytes_per_s=float(ask["send_bytes_per_s"]),
        receive_bytes_per_s=float(ask["receive_bytes_per_s"]),
    )


async def read_message(reader: asyncio.StreamReader, timeout_s: float | None) -> dict[str, Any]:
    """The next line as a JSON object (within `timeout_s`, None: no limit); ConnectionError
    at end of file."""
    line = await asyncio.wait_for(reader.readline(), timeout_s)
    if not line.endswith(b"\n"):
        raise ConnectionError("connection closed")
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {line[:80]!r}")
    return data


async def write_message(writer: asyncio.StreamWriter, data: dict[str, Any]) -> None:
    writer.write(json.dumps(data).encode() + b"\n")
    await writer.drain()


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # retrieved: an unread failure is not a bug worth a log line


class Room:
    """One bootstrap room on the prefill worker: its prefill half and its decode connection."""

    def __init__(self, room_id: int) -> None:
        loop = asyncio.get_running_loop()
        self.room_id = room_id
        self.prefilled: asyncio.Future[Prefilled] = loop.create_future()
        self.plan: asyncio.Future[TransferPlan] = loop.create_future()
        self.landed: asyncio.Future[None] = loop.create_future()
        self.gone = asyncio.Event()  # the prefill half ended before the KV landed
        self.arrived = asyncio.Event()  # a prefill half holds it (its prefill may be queued)
        self.claimed = False  # a decode connection holds it

    @property
    def attached(self) -> bool:
        return self.arrived.is_set()

    def fail(self, error: DisaggregationError) -> None:
        for future in (self.prefilled, self.plan, self.landed):
            _fail(future, error)


class BootstrapServer:
    """The prefill worker's side of the rendezvous."""

    def __init__(self, *, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.rooms: dict[int, Room] = {}
        self.egress = LinkPort()  # this worker's end of the link, shared by its transfers
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port); returns the port."""
        try:
            self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        except OSError as e:
            raise OSError(f"cannot serve the bootstrap port on {host}:{port}: {e}") from None
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for room in list(self.rooms.values()):
            room.fail(PartnerLostError("the prefill worker is shutting down"))
            room.gone.set()
        for writer in list(self._writers):
            writer.close()
        self.rooms.clear()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    def attach(self, room_id: int) -> Room:
        """The room a prefill half fills; its decode connection may be waiting already."""
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = Room(room_id)
        elif room.attached:
            raise InvalidRequestError(
                f"bootstrap room {room_id} is already in use on this prefill worker"
            )
        room.arrived.set()
        return room

    def discard(self, room: Room) -> None:
        if self.rooms.get(room.room_id) is room:
            del self.rooms[room.room_id]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        room: Room | None = None
        try:
            hello = await read_message(reader, self.timeout_s)
            room_id = hello.get("room")
            if isinstance(room_id, bool) or not isinstance(room_id, int):
                raise ValueError(f"room: expected an integer, got {room_id!r}")
            room = self.rooms.get(room_id)
            if room is None:
                room = self.rooms[room_id] = Room(room_id)
            elif room.claimed:
                room = None
                await write_message(
                    writer, {"error": "lost", "message": f"bootstrap room {room_id} is taken"}
                )
                return
            room.claimed = True
            await self._serve(room, reader, writer)
        except (OSError, TimeoutError, ValueError, KeyError, TypeError):
            if room is not None:
                room.fail(
                    PartnerLostError(
                        f"the decode half of bootstrap room {room.room_id} went away before "
                        "its KV transfer completed"
                    )
                )
        finally:
            if room is not None and not room.attached:
                self.discard(room)  # the decode half came alone, and leaves
            writer.close()
            self._writers.discard(writer)

    async def _serve(
        self, room: Room, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await asyncio.wait_for(room.arrived.wait(), self.timeout_s)
        except TimeoutError:
            why = (
                f"no prefill half of bootstrap room {room.room_id} reached the prefill worker "
                f"within {self.timeout_s:g} s"
            )
            await write_message(writer, {"error": "timeout", "message": why})
            return
        try:
            # However long the prefill queues: its half ends the room if it fails.
            prefilled = await asyncio.shield(room.prefilled)
        except DisaggregationError as e:
            await write_message(writer, {"error": "lost", "message": str(e)})
            return
        await write_message(writer, {"prefill": prefilled.as_dict()})
        message = await self._read_unless_gone(room, reader, self.timeout_s)
        booking = book_for(self.egress, message["book"])
        self.egress.add(booking)
        await write_message(writer, {"booking": booking_as_dict(booking)})
        message = await self._read_unless_gone(room, reader, self.timeout_s)
        plan = TransferPlan.from_dict(message["transfer"])
        room.plan.set_result(plan)
        wait_s = max(0.0, plan.end_s - time.monotonic()) + self.timeout_s
        message = await self._read_unless_gone(room, reader, wait_s)
        if message.get("done") is not True:
            raise ValueError(f"expected done, got {message!r}")
        room.landed.set_result(None)

    @staticmethod
    async def _read_unless_gone(
        room: Room, reader: asyncio.StreamReader, timeout_s: float
    ) -> dict[str, Any]:
        """The decode half's next message; ConnectionError if the prefill half ends first."""
        read = asyncio.ensure_future(read_message(reader, timeout_s))
        gone = asyncio.ensure_future(room.gone.wait())
        try:
            await asyncio.wait({read, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not read.done():
                read.cancel()
        if not read.done() or read.cancelled():
            raise ConnectionError("the prefill half ended")
        return read.result()
