"""The API key (`--api-key` or MEMORYWALL_API_KEY): one check for both fronts.

As vLLM's `--api-key`: HTTP routes under /v1/ and KServe v2's /v2/models/ need
`Authorization: Bearer KEY` (401 with an error body otherwise); /health,
/v2/health/*, /version and /metrics stay open, so load balancers and Prometheus
need no secret. gRPC: see `grpc_gate.py`.
Keys are compared with `hmac.compare_digest`, in time that does not depend on
where they differ.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from memorywall.errors import UnauthenticatedError

PROTECTED_PREFIXES = ("/v1/", "/v2/models/")


def bearer_matches(value: str | None, key: str) -> bool:
    """`Bearer KEY` (scheme case-insensitive), compared in constant time."""
    if value is None:
        return False
    scheme, _, token = value.partition(" ")
    same = hmac.compare_digest(token.strip().encode(), key.encode())
    return same and scheme.lower() == "bearer"


def require_api_key(key: str, reply) -> Middleware:
    """aiohttp middleware: protected routes answer `reply(UnauthenticatedError)` without the key."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(PROTECTED_PREFIXES) and not bearer_matches(
            request.headers.get("Authorization"), key
        ):
            return reply(
                UnauthenticatedError(
                    "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                )
            )
        return await handler(request)

    return check
