"""What every gRPC call passes before its servicer: the API key, and a request that decodes.

grpc answers a request whose bytes do not parse with UNKNOWN (the handler's
deserializer raised); here it is INVALID_ARGUMENT, a client error, as it is on
every other bad field. With an API key, a call must carry `authorization:
Bearer KEY` metadata (compared in constant time) or it ends UNAUTHENTICATED
before its servicer runs; health checks and reflection stay open, so probes and
tools such as grpcurl's `list` work without the key (the README states it).

Handlers are rewrapped once per method and cached; a server-streaming handler
gains one async-generator layer (grpc.aio runs only async generator functions as
streaming handlers), which closes the servicer's generator when it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from memorywall.server.fronts.auth import bearer_matches

OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Undecodable:
    """What the tolerant deserializer hands over when the bytes are not the message."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _decoding(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as e:
            return Undecodable(str(e))

    return decode


def _wrap(
    handler: grpc.RpcMethodHandler, refusal: tuple[grpc.StatusCode, str] | None
) -> grpc.RpcMethodHandler:
    """The same handler, refusing every call with `refusal` if given, else each undecodable one."""
    serialize = handler.response_serializer
    if handler.request_streaming:
        if refusal is None:
            return _checked_stream(handler) if handler.response_streaming else handler

        async def refuse_all(requests, context):
            await context.abort(*refusal)

        make = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        return make(refuse_all, handler.request_deserializer, serialize)

    def why(request: Any) -> tuple[grpc.StatusCode, str] | None:
        if refusal is not None:
            return refusal
        if isinstance(request, Undecodable):
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request: not a valid message ({request.reason})",
            )
        return None

    decode = _decoding(handler.request_deserializer)
    if handler.response_streaming:
        stream = handler.unary_stream

        async def unary_stream(request, context):
            reason = why(request)
            if reason is not None:
                await context.abort(*reason)
            responses = stream(request, context)
            try:
                async for response in responses:
                    yield response
            finally:  # cancelled or done: the servicer's own cleanup runs now, not at GC
                await responses.aclose()

        return grpc.unary_stream_rpc_method_handler(unary_stream, decode, serialize)
    unary = handler.unary_unary

    async def unary_unary(request, context):
        reason = why(request)
        if reason is not None:
            await context.abort(*reason)
        return await unary(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, decode, serialize)


def _checked_stream(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A bidirectional stream (KServe's ModelStreamInfer) that ends INVALID_ARGUMENT at the
    first message that does not decode."""
    inner = handler.stream_stream

    async def stream_stream(requests, context):
        async def decoded():
            async for request in requests:
                if isinstance(request, Undecodable):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"request: not a valid message ({request.reason})",
                    )
                yield request

        responses = inner(decoded(), context)
        try:
            async for response in responses:
                yield response
        finally:  # cancelled or done: the servicer's own cleanup runs now, not at GC
            await responses.aclose()

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, _decoding(handler.request_deserializer), handler.response_serializer
    )


class GrpcGate(grpc.aio.ServerInterceptor):
    """Server interceptor: decodable requests only, and the API key where one is set."""

    def __init__(self, *, api_key: str | None = None, open_methods: Sequence[str] = OPEN_METHODS):
        self.api_key = api_key
        self.open_methods = tuple(open_methods)
        self._admitted: dict[str, grpc.RpcMethodHandler] = {}
        self._refused: dict[str, grpc.RpcMethodHandler] = {}

    def _authorized(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        if self.api_key is None or method.startswith(self.open_methods):
            return True
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        return bearer_matches(value if isinstance(value, str) else None, self.api_key)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        if not self._authorized(method, handler_call_details.invocation_metadata):
            if method not in self._refused:
                refusal = (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or wrong API key: send metadata 'authorization: Bearer <key>'",
                )
                self._refused[method] = _wrap(handler, refusal)
            return self._refused[method]
        if method not in self._admitted:
            self._admitted[method] = _wrap(handler, None)
        return self._admitted[method]
