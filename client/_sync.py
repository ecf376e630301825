"""`Client`: the base plus blocking grpc send and stream; the twin of `AsyncClient`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2_grpc

from memorywall.client import _base, _convert
from memorywall.client._base import GenerateArgs, translate
from memorywall.client._types import GenerateResult, ModelInfo, ServerInfo, TokenChunk
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc


class GenerateStream:
    """One Generate call: iterate it for TokenChunks, then read `result`.

    `close()` or leaving `with` cancels the RPC, so the server frees the request.
    """

    def __init__(self, call: Any, request_id: str, sent_ns: int) -> None:
        self._call = call  # a grpc call that is also an iterator of responses
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

    def __iter__(self) -> Iterator[TokenChunk]:
        return self

    def __next__(self) -> TokenChunk:
        while not self._done:
            try:
                msg = next(self._call)
                received_ns = _base.now_ns()
                chunk = self._assembler.feed(msg, received_ns)
            except StopIteration:
                self._done = True
                self._assembler.end()
                break
            except grpc.RpcError as exc:
                if self._done:  # close() from another thread cancelled the call: end quietly
                    break
                self._stop()
                raise translate(exc) from exc
            except BaseException:  # KeyboardInterrupt, ProtocolError: the server must not go on
                self._stop()
                raise
            if chunk is not None:
                return chunk
        raise StopIteration

    def _stop(self) -> None:
        self._done = True
        self._call.cancel()

    def close(self) -> None:
        """Cancel the RPC if it is still running; a finished stream is left as it is."""
        self._stop()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Client(_base.BaseClient):
    """A blocking client for a memorywall engine; use as `with Client(...) as c`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout_s: float | None = None,
        options: _base.ChannelOptions = (),
        tls: _base.Tls | None = None,
        api_key: str | None = None,
    ) -> None:
        super().__init__(target, timeout_s=timeout_s, options=options, tls=tls, api_key=api_key)
        self._channel: grpc.Channel | None = None

    def _open(self) -> grpc.Channel:
        # Made on first use, like AsyncClient's, so the twins open and close alike.
        if self._channel is None:
            self._channel = (
                grpc.insecure_channel(self.target, options=self._options)
                if self.tls is None
                else grpc.secure_channel(self.target, self.tls.credentials(), self._options)
            )
            self._engine = engine_pb2_grpc.EngineStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)
        return self._channel

    def generate(self, **args: Unpack[GenerateArgs]) -> GenerateStream:
        """Start a Generate call; arguments as `build_generate_request`, plus `timeout_s`."""
        request, timeout_s = self._prepare(dict(args))
        self._open()
        sent_ns = _base.now_ns()
        call = self._engine.Generate(request, timeout=timeout_s, metadata=self._metadata)
        return GenerateStream(call, request.request_id, sent_ns)

    def complete(self, **args: Unpack[GenerateArgs]) -> GenerateResult:
        """Run a whole Generate call and return its result."""
        with self.generate(**args) as stream:
            for _ in stream:
                pass
        return stream.result

    def _unary(self, method: str, request: Any, timeout_s: float | None) -> Any:
        self._open()
        try:
            return getattr(self._engine, method)(
                request, timeout=self._deadline_s(timeout_s), metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise translate(exc) from exc

    def abort(self, *request_ids: str, timeout_s: float | None = None) -> list[str]:
        """Abort requests by id; returns the ids that were live and are now aborted."""
        request = pb.AbortRequest(request_ids=_base.check_request_ids(request_ids))
        return list(self._unary("Abort", request, timeout_s).aborted)

    def model_info(self, *, timeout_s: float | None = None) -> ModelInfo:
        msg = self._unary("GetModelInfo", pb.GetModelInfoRequest(), timeout_s)
        return _convert.model_info_from_proto(msg)

    def server_info(self, *, timeout_s: float | None = None) -> ServerInfo:
        msg = self._unary("GetServerInfo", pb.GetServerInfoRequest(), timeout_s)
        return _convert.server_info_from_proto(msg)

    def health(self, *, timeout_s: float | None = None) -> bool:
        """True if the server reports SERVING; False if it is down, unknown or not serving."""
        self._open()
        try:
            response = self._health.Check(_base.HEALTH_REQUEST, timeout=self._deadline_s(timeout_s))
        except grpc.RpcError as exc:
            if _base.unhealthy(exc):
                return False
            raise translate(exc) from exc
        return _base.is_serving(response)

    def close(self) -> None:
        """Close the channel, cancelling calls still running; a later call opens a new one."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
