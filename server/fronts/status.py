"""Domain errors to wire statuses: one table that every front end uses.

The most specific class in an error's MRO wins. ContextLengthError and
RequestTooLargeError are InvalidRequestErrors: INVALID_ARGUMENT / 400, as vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from memorywall.errors import (
    CapacityError,
    DrainingError,
    DuplicateRequestError,
    InvalidRequestError,
    MemorywallError,
    NotFoundError,
)


@dataclass(frozen=True)
class WireStatus:
    grpc: grpc.StatusCode
    http: int


STATUS_FOR: dict[type[MemorywallError], WireStatus] = {
    InvalidRequestError: WireStatus(grpc.StatusCode.INVALID_ARGUMENT, 400),
    NotFoundError: WireStatus(grpc.StatusCode.NOT_FOUND, 404),
    DuplicateRequestError: WireStatus(grpc.StatusCode.ALREADY_EXISTS, 409),
    CapacityError: WireStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    DrainingError: WireStatus(grpc.StatusCode.UNAVAILABLE, 503),
}
INTERNAL = WireStatus(grpc.StatusCode.INTERNAL, 500)


def wire_status(error: MemorywallError) -> WireStatus:
    for cls in type(error).__mro__:
        if cls in STATUS_FOR:
            return STATUS_FOR[cls]
    return INTERNAL


def grpc_status(error: MemorywallError) -> grpc.StatusCode:
    return wire_status(error).grpc


def http_status(error: MemorywallError) -> int:
    return wire_status(error).http
