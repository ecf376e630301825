"""Domain errors to wire statuses: one table that every front end uses.

The most specific class in an error's MRO wins. ContextLengthError and
RequestTooLargeError are InvalidRequestErrors: INVALID_ARGUMENT / 400, as vLLM;
PayloadTooLargeError is INVALID_ARGUMENT / 413. Injected faults have a table of
their own (`FAULT_STATUS`): they are the only errors that may answer INTERNAL on
purpose. Besides the status, some errors carry metadata: an overloaded server
says when to retry (HTTP `Retry-After`, gRPC `grpc-retry-pushback-ms` as gRPC's
retry design reads it) and an injected fault names itself (`x-memorywall-fault`).
The same header on a request asks for a fault: `grpc_fault` and `http_fault` read
it for every front, to pass to `EngineClient.submit`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import grpc

from memorywall.errors import (
    CapacityError,
    DisaggregationError,
    DrainingError,
    DuplicateRequestError,
    InjectedFaultError,
    InjectedInternalError,
    InjectedOverloadError,
    InjectedTimeoutError,
    InjectedUnavailableError,
    InvalidRequestError,
    LifecycleError,
    MemorywallError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
    PartnerTimeoutError,
    PayloadTooLargeError,
    UnauthenticatedError,
)
from memorywall.server.engine.api import FaultRule, fault_from_header

FAULT_HEADER = "x-memorywall-fault"


def grpc_metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    """The first value of invocation metadata `key` (lower case), or None."""
    return next((v for k, v in context.invocation_metadata() or () if k == key), None)


def grpc_fault(context: grpc.aio.ServicerContext) -> FaultRule | None:
    """The fault a gRPC call asks for in its metadata, or None; InvalidRequestError if
    malformed."""
    return fault_from_header(grpc_metadata(context, FAULT_HEADER))


def http_fault(headers: Mapping[str, str]) -> FaultRule | None:
    """The fault an HTTP request asks for in its headers, or None; InvalidRequestError if
    malformed."""
    return fault_from_header(headers.get(FAULT_HEADER))


@dataclass(frozen=True)
class WireStatus:
    grpc: grpc.StatusCode
    http: int


STATUS_FOR: dict[type[MemorywallError], WireStatus] = {
    InvalidRequestError: WireStatus(grpc.StatusCode.INVALID_ARGUMENT, 400),
    PayloadTooLargeError: WireStatus(grpc.StatusCode.INVALID_ARGUMENT, 413),
    UnauthenticatedError: WireStatus(grpc.StatusCode.UNAUTHENTICATED, 401),
    NotFoundError: WireStatus(grpc.StatusCode.NOT_FOUND, 404),
    DuplicateRequestError: WireStatus(grpc.StatusCode.ALREADY_EXISTS, 409),
    CapacityError: WireStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    OverloadedError: WireStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    DrainingError: WireStatus(grpc.StatusCode.UNAVAILABLE, 503),
    NotReadyError: WireStatus(grpc.StatusCode.UNAVAILABLE, 503),
    LifecycleError: WireStatus(grpc.StatusCode.FAILED_PRECONDITION, 409),
    DisaggregationError: WireStatus(grpc.StatusCode.UNAVAILABLE, 503),
    PartnerTimeoutError: WireStatus(grpc.StatusCode.DEADLINE_EXCEEDED, 504),
}
FAULT_STATUS: dict[type[InjectedFaultError], WireStatus] = {
    InjectedUnavailableError: WireStatus(grpc.StatusCode.UNAVAILABLE, 503),
    InjectedOverloadError: WireStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    InjectedInternalError: WireStatus(grpc.StatusCode.INTERNAL, 500),
    InjectedTimeoutError: WireStatus(grpc.StatusCode.DEADLINE_EXCEEDED, 504),
}
INTERNAL = WireStatus(grpc.StatusCode.INTERNAL, 500)


def wire_status(error: MemorywallError) -> WireStatus:
    table = FAULT_STATUS if isinstance(error, InjectedFaultError) else STATUS_FOR
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return INTERNAL


def grpc_status(error: MemorywallError) -> grpc.StatusCode:
    return wire_status(error).grpc


def http_status(error: MemorywallError) -> int:
    return wire_status(error).http


def http_headers(error: MemorywallError) -> dict[str, str]:
    """Headers an HTTP error answer carries besides its body."""
    if isinstance(error, OverloadedError):
        return {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    if isinstance(error, InjectedFaultError):
        return {FAULT_HEADER: error.fault}
    if isinstance(error, UnauthenticatedError):
        return {"WWW-Authenticate": "Bearer"}
    return {}


def grpc_trailers(error: MemorywallError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata a gRPC error status carries."""
    if isinstance(error, OverloadedError):
        return (("grpc-retry-pushback-ms", str(max(0, round(error.retry_after_s * 1e3)))),)
    if isinstance(error, InjectedFaultError):
        return ((FAULT_HEADER, error.fault),)
    return ()
