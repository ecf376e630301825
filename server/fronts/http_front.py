"""The OpenAI-compatible HTTP front: a thin aiohttp adapter over the same engine as gRPC.

Routes: POST /v1/completions, /v1/chat/completions and /v1/responses (streaming as
SSE or one JSON body; `openai_responses.py`), POST /tokenize and /detokenize (vLLM's),
GET /v1/models, /health, /version and /metrics, the lifecycle endpoints
(`lifecycle_routes.py`) and, with --enable-lora, vLLM's adapter endpoints
(`openai_lora.py`). Requests are parsed in `openai_api.py`, responses shaped in
`openai_reply.py`; this module converts, submits, streams and turns a disconnect into
an engine abort, as `grpc_servicer.py` does. Each token group the engine hands over is written at
once: no buffering, and aiohttp (like asyncio) sets TCP_NODELAY on every
accepted socket, so Nagle never holds a small write (a test checks it). A one-choice
stream the engine can hand over synchronously is written from the engine's own step
(`openai_sink.py`, through `write_now`): its handler task wakes once, at the end, not
once a message.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from aiohttp import web
from aiohttp.typedefs import Middleware

from memorywall import __version__
from memorywall.errors import InvalidRequestError, MemorywallError
from memorywall.server.config import MAX_BODY_BYTES
from memorywall.server.engine.api import (
    EngineClient,
    EngineObserver,
    EventStream,
    LoraRegistry,
    ModelCard,
)
from memorywall.server.fronts import openai_stream
from memorywall.server.fronts.auth import require_api_key
from memorywall.server.fronts.lifecycle_routes import lifecycle_routes
from memorywall.server.fronts.openai_api import Call, Endpoint, OpenAIApi, error_body, error_for
from memorywall.server.fronts.openai_lora import adapter_models, lora_routes
from memorywall.server.fronts.openai_reply import Reply, model_list
from memorywall.server.fronts.openai_responses import ResponseReply, chat_body
from memorywall.server.fronts.openai_sink import WriteNow
from memorywall.server.fronts.openai_stream import stream_events
from memorywall.server.fronts.status import http_fault, http_headers
from memorywall.server.fronts.tokenizer import PromptTokenizer

SHUTDOWN_TIMEOUT_S = 1.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class MetricsSource(Protocol):
    """What /metrics serves (`server/fronts/metrics.py`'s PrometheusMetrics)."""

    def render(self) -> tuple[bytes, str]: ...  # body, content type


class ServedMetrics(EngineObserver, MetricsSource, Protocol):
    """Metrics the engine feeds and /metrics renders."""


def error_response(status: int, body: dict, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def error_reply(error: MemorywallError) -> web.Response:
    """A domain error as its status, OpenAI error body and headers (Retry-After, ...)."""
    return error_response(*error_for(error), http_headers(error))


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (unknown route, wrong method, body too large) as OpenAI bodies."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, error_body(e.status, e.reason))


class OpenAIFront:
    def __init__(
        self,
        engine: EngineClient,
        card: ModelCard,
        tokenizer: PromptTokenizer,
        metrics: MetricsSource | None = None,
        *,
        max_request_bytes: int = MAX_BODY_BYTES,
        api_key: str | None = None,
        lora: LoraRegistry | None = None,
    ) -> None:
        self.engine = engine
        self.max_request_bytes = max_request_bytes
        self.api_key = api_key
        self.card = card
        self.lora = lora  # with --enable-lora: `openai_lora.py`'s endpoints and models
        self.api = OpenAIApi(card, tokenizer, lora)
        self.metrics = metrics
        self.created = int(time.time())

    def app(self) -> web.Application:
        middlewares: list[Middleware] = [openai_errors]
        if self.api_key is not None:
            middlewares.append(require_api_key(self.api_key, error_reply))
        app = web.Application(client_max_size=self.max_request_bytes, middlewares=middlewares)
        routes: list[tuple[str, str, Handler]] = [
            ("POST", "/v1/completions", self.completions),
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("POST", "/v1/responses", self.responses),
            ("GET", "/v1/models", self.models),
            ("POST", "/tokenize", self.tokenize),
            ("POST", "/detokenize", self.detokenize),
            ("GET", "/health", self.health),
            ("GET", "/version", self.version),
            *lifecycle_routes(self.engine, error_reply),
        ]
        if self.metrics is not None:
            routes.append(("GET", "/metrics", metrics_handler(self.metrics)))
        if self.lora is not None:
            routes += lora_routes(self.lora, error_reply)
        for method, path, handler in routes:
            app.router.add_route(method, path, handler, expect_handler=expect_continue)
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        # Modelled time starts when the request reaches us, not after we parsed it.
        arrival_s = self.engine.now()
        return await self._generate(request, Endpoint.COMPLETIONS, arrival_s)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        arrival_s = self.engine.now()
        return await self._generate(request, Endpoint.CHAT, arrival_s)

    async def _generate(
        self, request: web.Request, endpoint: Endpoint, arrival_s: float
    ) -> web.StreamResponse:
        streams: list[EventStream] = []
        try:
            try:
                body = await _json_body(request)
                call = self.api.to_call(body, endpoint, request.headers.get("X-Request-Id"))
                fault = http_fault(request.headers)
                for choice in call.choices:  # n samples: n engine requests
                    streams.append(
                        self.engine.submit(
                            choice.request,
                            min_interval_s=call.min_interval_s,
                            arrival_s=arrival_s,
                            fault=fault,
                        )
                    )
            except MemorywallError as e:
                return error_reply(e)
            created = int(time.time())
            model = call.model or self.card.model
            replies = [Reply(call, model, created, i) for i in range(len(streams))]
            if call.stream:
                return await self._stream(request, streams, call, replies)
            return await self._complete(streams, call, replies)
        finally:
            # Cancelled or client gone (aiohttp cancels the handler): free slots and KV now.
            for stream in streams:
                stream.close()

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API, on the chat path (`openai_responses.py`)."""
        arrival_s = self.engine.now()
        stream: EventStream | None = None
        try:
            try:
                body = await _json_body(request)
                chat = chat_body(body)
                call = self.api.to_call(chat, Endpoint.CHAT, request.headers.get("X-Request-Id"))
                stream = self.engine.submit(
                    call.request, arrival_s=arrival_s, fault=http_fault(request.headers)
                )
            except MemorywallError as e:
                return error_reply(e)
            reply = Reply(call, call.model or self.card.model, int(time.time()))
            out = ResponseReply(call, reply, cast(dict[str, Any], body))  # chat_body checked
            if not call.stream:
                try:
                    chat_out = await openai_stream.response([stream], [reply])
                except MemorywallError as e:
                    return error_reply(e)
                return web.json_response(out.from_chat(chat_out), headers=_headers(call))
            response = web.StreamResponse(headers=_headers(call, "text/event-stream"))
            try:
                await response.prepare(request)
                await out.stream(stream, response.write)
            except ConnectionResetError:
                pass  # the client left; the request is aborted below
            except MemorywallError as e:  # the server drained before the request finished
                await response.write(out.event("error", **error_for(e)[1]["error"]))
            return response
        finally:
            if stream is not None:
                stream.close()

    async def _stream(
        self, request: web.Request, streams: list[EventStream], call: Call, replies: list[Reply]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_headers(call, "text/event-stream"))
        try:
            # Headers go out now, not with the first token: clients start TTFT clocks on them.
            await response.prepare(request)
            await stream_events(streams, replies, response.write, write_now(request, response))
        except ConnectionResetError:
            pass  # the client left; the caller aborts the request
        return response

    async def _complete(
        self, streams: list[EventStream], call: Call, replies: list[Reply]
    ) -> web.Response:
        try:
            body = await openai_stream.response(streams, replies)
        except MemorywallError as e:
            return error_reply(e)
        return web.json_response(body, headers=_headers(call))

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self.api.tokenize(await _json_body(request)))
        except MemorywallError as e:
            return error_reply(e)

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self.api.detokenize_body(await _json_body(request)))
        except MemorywallError as e:
            return error_reply(e)

    async def models(self, request: web.Request) -> web.Response:
        models = model_list(self.card, self.created)
        if self.lora is not None:
            models["data"] += adapter_models(self.lora, self.card.model, self.created)
        return web.json_response(models)

    async def health(self, request: web.Request) -> web.Response:
        """200 once the weights are loaded (asleep too, as vLLM), 503 before and once
        draining (vLLM's /health answers 200 with no body)."""
        ok = self.engine.lifecycle.loaded and not self.engine.draining
        return web.Response(status=200 if ok else 503)

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})


async def expect_continue(request: web.Request) -> None:
    """aiohttp's own `Expect` handling, except that an unknown value is quoted ASCII-escaped
    (aiohttp's 417 raised UnicodeEncodeError, a 500, on a non-UTF-8 value)."""
    expect = request.headers.get("Expect", "")
    if request.version != (1, 1):
        return
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect!a}")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim response is not part of the body


def metrics_handler(metrics: MetricsSource) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    return handle


def metrics_app(handler: Handler) -> web.Application:
    """Only /metrics, answered by `handler` (`metrics_handler`'s, or a front process's that
    asks the engine process): for a gRPC-only server's --metrics-port."""
    app = web.Application(middlewares=[openai_errors])
    app.router.add_get("/metrics", handler)
    return app


class HttpSite:
    """One aiohttp application bound to host:port. `await start()` returns the bound port."""

    def __init__(
        self,
        app: web.Application,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,  # several processes bind the same port (`--api-servers`)
    ) -> None:
        self.ssl_context = ssl_context
        self.reuse_port = reuse_port
        # handler_cancellation: a client that disconnects cancels its handler at once, which
        # aborts its request, even while it waits in the queue with nothing to write.
        # lingering_time=0: a body the handler did not read (refused early, or undecodable)
        # closes the connection instead of being read on, which for an undecodable one
        # made aiohttp log an "Unhandled exception".
        self.runner = web.AppRunner(
            app,
            handler_cancellation=True,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            access_log=None,
            lingering_time=0,
        )
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        await self.runner.setup()
        site = web.TCPSite(
            self.runner, host, port, reuse_port=self.reuse_port, ssl_context=self.ssl_context
        )
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            raise OSError(f"cannot serve HTTP on {host}:{port}: {e.strerror or e}") from None
        self.port = self.runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        await self.runner.cleanup()


def write_now(request: web.Request, response: web.StreamResponse) -> WriteNow | None:
    """A prepared streaming response's body writes, made synchronously: each one framed
    and sent as aiohttp's payload writer sends it (one transport write; a chunk of HTTP/1.1's
    chunked encoding), False instead while the transport is paused for flow control or
    closing (the awaited `response.write` then drains or raises). None where aiohttp must
    transform the bytes itself (compression, a declared length)."""
    writer, protocol, transport = request.writer, request.protocol, request.transport
    if response.compression or transport is None or writer.length is not None:
        return None
    chunked = getattr(writer, "chunked", None)
    if not isinstance(chunked, bool):
        return None  # not aiohttp's StreamWriter

    def write(data: bytes) -> bool:
        if protocol.writing_paused or transport.is_closing():
            return False
        if chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        writer.output_size += len(data)  # as the payload writer counts it
        transport.write(data)
        return True

    return write


def _headers(call: Call, content_type: str | None = None) -> dict[str, str]:
    headers = {"X-Request-Id": call.request_id}
    if content_type is not None:
        headers.update({"Content-Type": content_type, "Cache-Control": "no-cache"})
    return headers


async def _json_body(request: web.Request) -> object:
    try:
        raw = await request.read()
    except web.RequestPayloadError as e:  # a body its Content-Encoding cannot decode, say
        raise InvalidRequestError(f"request body: unreadable ({e})") from None
    try:
        return json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidRequestError(f"request body: not valid JSON ({e})") from None
