"""`AsyncClient`: the base plus grpc.aio send and stream."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2_grpc

from memorywall.client import _base, _convert
from memorywall.client._base import GenerateArgs, translate
from memorywall.client._types import GenerateResult, ModelInfo, ServerInfo, TokenChunk
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc


class AsyncGenerateStream:
    """One Generate call: async-iterate it for TokenChunks, then read `result`.

    `aclose()`, leaving `async with`, or cancelling the iterating task cancels the
    RPC, so the server frees the request.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall, request_id: str, sent_ns: int) -> None:
        self._call = call
        self._assembler = _convert.StreamAssembler(request_id, sent_ns)
        self._done = False

    @property
    def request_id(self) -> str:
        return self._assembler.request_id

    @property
    def sent_ns(self) -> int:
        """`time.perf_counter_ns()` just before the call started."""
        return self._assembler.sent_ns

    @property
    def result(self) -> GenerateResult:
        """The finished request; raises `StreamNotFinished` before the stream ends."""
        return _convert.finished_result(self._assembler.result, self.request_id)

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> TokenChunk:
        while not self._done:
            try:
                msg = await self._call.read()
                received_ns = _base.now_ns()
                if msg is grpc.aio.EOF:
                    self._done = True
                    self._assembler.end()
                    break
                chunk = self._assembler.feed(msg, received_ns)
            except grpc.aio.AioRpcError as exc:
                self._stop()
                raise translate(exc) from exc
            except asyncio.CancelledError:
                # aclose() from another task cancels our read: end quietly, unless this
                # task itself is being cancelled.
                task = asyncio.current_task()
                closed_elsewhere = self._done and not (task and task.cancelling())
                self._stop()
                if closed_elsewhere:
                    break
                raise
            except BaseException:  # ProtocolError and the like: the server must not go on
                self._stop()
                raise
            if chunk is not None:
                return chunk
        raise StopAsyncIteration

    def _stop(self) -> None:
        self._done = True
        self._call.cancel()

    async def aclose(self) -> None:
        """Cancel the RPC if it is still running; a finished stream is left as it is."""
        self._stop()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class AsyncClient(_base.BaseClient):
    """An asyncio client for a memorywall engine; use as `async with AsyncClient(...) as c`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout_s: float | None = None,
        options: _base.ChannelOptions = (),
        tls: _base.Tls | None = None,
        api_key: str | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        """`interceptors`: grpc.aio client interceptors on the channel (tracing's)."""
        super().__init__(target, timeout_s=timeout_s, options=options, tls=tls, api_key=api_key)
        self._interceptors = list(interceptors) or None
        self._channel: grpc.aio.Channel | None = None

    def _open(self) -> grpc.aio.Channel:
        # Made on first use, inside the running loop: an aio channel belongs to one loop.
        if self._channel is None:
            self._channel = (
                grpc.aio.insecure_channel(
                    self.target, options=self._options, interceptors=self._interceptors
                )
                if self.tls is None
                else grpc.aio.secure_channel(
                    self.target,
                    self.tls.credentials(),
                    self._options,
                    interceptors=self._interceptors,
                )
            )
            self._engine = engine_pb2_grpc.EngineStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)
        return self._channel

    def generate(self, **args: Unpack[GenerateArgs]) -> AsyncGenerateStream:
        """Start a Generate call; arguments as `build_generate_request`, plus `timeout_s`."""
        request, timeout_s = self._prepare(dict(args))
        self._open()
        sent_ns = _base.now_ns()
        call = self._engine.Generate(request, timeout=timeout_s, metadata=self._metadata)
        return AsyncGenerateStream(call, request.request_id, sent_ns)

    async def complete(self, **args: Unpack[GenerateArgs]) -> GenerateResult:
        """Run a whole Generate call and return its result."""
        async with self.generate(**args) as stream:
            async for _ in stream:
                pass
        return stream.result

    async def _unary(self, method: str, request: Any, timeout_s: float | None) -> Any:
        self._open()
        try:
            return await getattr(self._engine, method)(
                request, timeout=self._deadline_s(timeout_s), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise translate(exc) from exc

    async def abort(self, *request_ids: str, timeout_s: float | None = None) -> list[str]:
        """Abort requests by id; returns the ids that were live and are now aborted."""
        request = pb.AbortRequest(request_ids=_base.check_request_ids(request_ids))
        return list((await self._unary("Abort", request, timeout_s)).aborted)

    async def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        msg = await self._unary("GetModelInfo", pb.GetModelInfoRequest(), timeout_s)
        return _convert.model_info_from_proto(msg)

    async def server_info(self, *, timeout_s: float | None = None) -> ServerInfo:
        msg = await self._unary("GetServerInfo", pb.GetServerInfoRequest(), timeout_s)
        return _convert.server_info_from_proto(msg)

    async def health(self, *, timeout_s: float | None = None) -> bool:
        """True if the server reports SERVING; False if it is down, unknown or not serving."""
        self._open()
        try:
            response = await self._health.Check(
                _base.HEALTH_REQUEST, timeout=self._deadline_s(timeout_s)
            )
        except grpc.aio.AioRpcError as exc:
            if _base.unhealthy(exc):
                return False
            raise translate(exc) from exc
        return _base.is_serving(response)

    async def aclose(self) -> None:
        """Close the channel, cancelling calls still running; a later call opens a new one."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
