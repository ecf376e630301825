"""Errors the client raises: one class per gRPC status family, all under `ClientError`."""

from __future__ import annotations

import grpc

from memorywall.errors import MemorywallError


class ClientError(MemorywallError):
    """An RPC failed; `code` is the gRPC status and `details` the server's message.

    Subclasses: `InvalidRequest`, `NotFound`, `AlreadyExists`, `ResourceExhausted`,
    `Unavailable`, `DeadlineExceeded`, `Cancelled`, `Unimplemented`, `Unauthenticated`,
    `ProtocolError`.
    Any other status raises `ClientError` itself.
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidRequest(ClientError):
    """The server rejected the request (INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION)."""


class NotFound(ClientError):
    """NOT_FOUND: an unknown model or request id."""


class AlreadyExists(ClientError):
    """ALREADY_EXISTS: the request id is already live."""


class ResourceExhausted(ClientError):
    """RESOURCE_EXHAUSTED: the server cannot take the request (queue or KV full)."""


class Unavailable(ClientError):
    """UNAVAILABLE: the server cannot be reached, or is draining."""


class DeadlineExceeded(ClientError):
    """DEADLINE_EXCEEDED: the call's `timeout_s` ran out."""


class Cancelled(ClientError):
    """CANCELLED by the server (a client that cancels its own stream sees no error)."""


class Unimplemented(ClientError):
    """UNIMPLEMENTED: the server does not offer this RPC yet."""


class Unauthenticated(ClientError):
    """UNAUTHENTICATED: the server wants an API key (`api_key=`) and got none or another."""


class ProtocolError(ClientError):
    """The server broke the wire contract (for example a stream with no `Finished`)."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.INTERNAL, details)


class StreamNotFinished(MemorywallError, RuntimeError):
    """A stream's `result` was read before its `Finished` message arrived."""
