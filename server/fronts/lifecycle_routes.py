"""vLLM's lifecycle endpoints over the engine (`api.EngineClient`'s lifecycle calls).

POST /sleep?level=1|2 (1 frees the KV cache, 2 the weights too), POST /wake_up
(returns once the weights are back, after the core's load time), GET /is_sleeping
(`{"is_sleeping": bool}`) and POST /reset_prefix_cache (AIPerf's
`--reset-kv-cache` and vLLM's benchmark sweeps call it between runs). vLLM serves
the first three only with VLLM_SERVER_DEV_MODE=1; the emulator always does.
Answers are vLLM's: 200 with no body, or an OpenAI error body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from memorywall.errors import InvalidRequestError, LifecycleError, MemorywallError
from memorywall.server.engine.api import SLEEP_LEVELS, EngineClient

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorReply = Callable[[MemorywallError], web.Response]


def lifecycle_routes(
    engine: EngineClient, error_reply: ErrorReply
) -> list[tuple[str, str, Handler]]:
    """(method, path, handler) for each lifecycle endpoint."""

    async def sleep(request: web.Request) -> web.Response:
        raw = request.query.get("level", "1")
        try:
            level = int(raw) if raw.isascii() and raw.isdigit() else None
            if level not in SLEEP_LEVELS:
                raise InvalidRequestError(f"level: must be 1 or 2, got {raw!a}")
            await engine.sleep(level)
        except MemorywallError as e:
            return error_reply(e)
        return web.Response(status=200)

    async def wake_up(request: web.Request) -> web.Response:
        try:
            await engine.wake_up()
        except MemorywallError as e:
            return error_reply(e)
        return web.Response(status=200)

    async def is_sleeping(request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": engine.lifecycle.sleeping})

    async def reset_prefix_cache(request: web.Request) -> web.Response:
        try:
            if not await engine.reset_prefix_cache():
                raise LifecycleError("reset_prefix_cache: requests hold KV blocks; retry when idle")
        except MemorywallError as e:
            return error_reply(e)
        return web.Response(status=200)

    return [
        ("POST", "/sleep", sleep),
        ("POST", "/wake_up", wake_up),
        ("GET", "/is_sleeping", is_sleeping),
        ("POST", "/reset_prefix_cache", reset_prefix_cache),
    ]
