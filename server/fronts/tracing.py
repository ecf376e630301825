"""OpenTelemetry traces of each request's modelled timeline (`serve --otlp-endpoint`).

One span per request, continuing the client's W3C `traceparent` (an HTTP header,
gRPC metadata), with a child span per phase: `queue`, `prefill`, `decode`
(they tile the request's modelled end-to-end time), and in a disaggregated
decode worker `remote_prefill` and `kv_transfer` before them; under the phases,
one `prefill_chunk` per chunk the scheduler ran, `preemption` for the time a
preempted request waited to run again, and `host_stall` where the host moved
the timeline later. Every time is modelled (the engine's clock, which is
CLOCK_MONOTONIC when live, moved onto the wall clock once), so a trace shows
what the emulated hardware would, as vLLM and SGLang's `--otlp-traces-endpoint`
show real hardware.

Per-chunk times come through the observer seam: the `TraceRecorder` asks the
engine for each step's batch (`StepReport.batch`, built only when an observer
wants it) and keeps each live request's parts until it finishes. Spans are
made when a front reads the request's `Finished` (`TracedEngine` wraps what the
fronts talk to), and leave through the SDK's batch processor, off the event loop.

This module imports the OpenTelemetry SDK (the `[otel]` extra): the server loads
it only when tracing is asked for.
"""

from __future__ import annotations

import contextvars
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web

from memorywall.errors import ConfigError
from memorywall.server.engine.api import (
    EngineClient,
    EngineStats,
    Event,
    EventIteration,
    EventStream,
    Finished,
    StepReport,
)

try:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover - depends on the install
    raise ConfigError(
        "--otlp-endpoint needs OpenTelemetry: pip install 'memorywall[otel]'"
    ) from None

SERVICE_NAME = "memorywall"
# How many finished requests' step records wait for their stream to be read: a client that
# leaves before reading `Finished` never collects its own.
KEEP_FINISHED = 10_000

# The incoming trace context of the request being handled: set per request by the HTTP
# middleware or the gRPC interceptor, read when the front submits (same task).
_PARENT: contextvars.ContextVar[Context | None] = contextvars.ContextVar(
    "memorywall_trace_parent", default=None
)
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True, slots=True)
class Part:
    """One step's share of a request, on the engine's clock."""

    start_s: float
    end_s: float
    position: int
    tokens: int
    decoding: bool
    stalled_s: float  # host stall just before the step began


class TraceRecorder:
    """An `EngineObserver` keeping each live request's step parts, until its stream takes them."""

    wants_batch = True  # tells the engine to build `StepReport.batch`

    def __init__(self, keep: int = KEEP_FINISHED) -> None:
        self.keep = keep
        self._live: dict[str, list[Part]] = {}
        # Requests that finished in the step being reported: the engine reports a request's
        # end (`on_finish`) before the step that gave its last token (`on_step`).
        self._ending: list[str] = []
        self._finished: OrderedDict[str, list[Part]] = OrderedDict()

    def watch(self, stats: Callable[[], EngineStats]) -> None:
        pass

    def on_step(self, step: StepReport) -> None:
        if step.batch:
            start, end, stalled = step.start_s, step.start_s + step.time_s, step.stalled_s
            live = self._live
            for e in step.batch:
                part = Part(start, end, e.position, e.tokens, e.decoding, stalled)
                parts = live.get(e.request_id)
                if parts is None:
                    live[e.request_id] = [part]
                else:
                    parts.append(part)
        if self._ending:
            for request_id in self._ending:
                self._finished[request_id] = self._live.pop(request_id, [])
            self._ending.clear()
            while len(self._finished) > self.keep:
                self._finished.popitem(last=False)

    def on_finish(self, finished: Finished) -> None:
        self._ending.append(finished.request_id)

    def on_lag(self, lag_s: float) -> None:
        pass

    def take(self, request_id: str) -> list[Part]:
        """A finished request's parts (once; empty if unknown). One aborted between steps is
        taken before any step reports it."""
        parts = self._finished.pop(request_id, None)
        if parts is not None:
            return parts
        if request_id in self._ending:
            self._ending.remove(request_id)
            return self._live.pop(request_id, [])
        return []


class Tracing:
    """The tracer, the recorder feeding it, and the hooks that read incoming context.

    `to_collector(url)` exports over OTLP/HTTP; tests pass any `SpanExporter` and
    a span processor of their own through `provider`. `epoch_offset_ns`: added to the
    engine clock's nanoseconds to get Unix time (default: measured now, for
    CLOCK_MONOTONIC).
    """

    def __init__(self, provider: TracerProvider, *, epoch_offset_ns: int | None = None) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("memorywall.server")
        self.recorder = TraceRecorder()
        if epoch_offset_ns is None:
            epoch_offset_ns = time.time_ns() - time.monotonic_ns()
        self.epoch_offset_ns = epoch_offset_ns

    @classmethod
    def to_collector(cls, endpoint: str) -> Tracing:
        """Spans batched to an OTLP/HTTP collector at `endpoint` (a full URL: .../v1/traces).
        OTEL_* variables apply: headers, timeout, batch sizes, sampler, resource."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return cls.with_exporter(OTLPSpanExporter(endpoint=endpoint))

    @classmethod
    def with_exporter(cls, exporter: SpanExporter, *, batch: bool = True, **kwargs) -> Tracing:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider = TracerProvider(resource=resource())
        provider.add_span_processor(
            BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        )
        return cls(provider, **kwargs)

    def shutdown(self) -> None:
        """Send what is batched and stop the exporter."""
        self.provider.shutdown()

    # What the fronts talk to

    def wrap(self, engine: EngineClient) -> TracedEngine:
        return TracedEngine(engine, self)

    def wrap_pd(self, pd: Any) -> Any:
        """A disaggregation role whose halves are traced (the SGLang servicer submits
        through it)."""
        return _TracedDisaggregation(pd, self)

    # Incoming context

    def http_middleware(self):
        @web.middleware
        async def continue_trace(request: web.Request, handler):
            token = _PARENT.set(_extract(request.headers))
            try:
                return await handler(request)
            finally:
                _PARENT.reset(token)

        return continue_trace

    def grpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        return _TraceInterceptor()

    # Spans

    def ns(self, engine_s: float) -> int:
        return round(engine_s * 1e9) + self.epoch_offset_ns

    def export(self, f: Finished, arrival_s: float, parent: Context | None) -> None:
        """The request's spans, from its summary and its recorded step parts."""
        parts = self.recorder.take(f.request_id)
        tracer, ns = self.tracer, self.ns
        a = arrival_s
        # What the engine did not see: a decode worker's remote prefill and KV transfer.
        before = max(f.e2e_s - (f.queue_s + f.prefill_s + f.decode_s), 0.0)
        end = a + f.e2e_s
        transfer: tuple[float, float] | None = None
        if f.kv_transfer_s > 0:
            if before > 0:  # decode half: the KV landed just before the engine got it
                transfer = (a + max(before - f.kv_transfer_s, 0.0), a + before)
            else:  # prefill half: the KV leaves after the first token
                transfer = (a + f.ttft_s, a + f.ttft_s + f.kv_transfer_s)
                end = max(end, transfer[1])
        root = tracer.start_span(
            "request",
            context=parent,
            kind=trace.SpanKind.SERVER,
            start_time=ns(a),
            attributes=_request_attributes(f),
        )
        root_ctx = trace.set_span_in_context(root)

        def child(name: str, start: float, stop: float, ctx=root_ctx, **attributes) -> Context:
            span = tracer.start_span(name, context=ctx, start_time=ns(start), attributes=attributes)
            span.end(end_time=ns(max(stop, start)))
            return trace.set_span_in_context(span)

        if transfer is not None and before > 0 and transfer[0] > a:
            child("remote_prefill", a, transfer[0])
        if transfer is not None:
            child("kv_transfer", *transfer, **{"memorywall.kv_bytes": f.kv_transfer_bytes})
        q0 = a + before
        p0 = q0 + f.queue_s
        d0 = p0 + f.prefill_s
        phases = [
            ("queue", q0, p0),
            ("prefill", p0, d0),
            ("decode", d0, d0 + f.decode_s),
        ]
        decode_steps = sum(1 for p in parts if p.decoding)
        contexts = []
        for name, start, stop in phases:
            attributes = {"memorywall.steps": decode_steps} if name == "decode" else {}
            contexts.append((start, stop, child(name, start, stop, **attributes)))

        def phase_of(t: float) -> Context:
            for start, stop, ctx in contexts:
                if start <= t < stop:
                    return ctx
            return root_ctx

        previous: Part | None = None
        for p in parts:
            if previous is not None and p.position < previous.position + previous.tokens:
                child("preemption", previous.end_s, p.start_s, phase_of(previous.end_s))
            if p.stalled_s > 0:
                s0 = p.start_s - p.stalled_s
                child("host_stall", s0, p.start_s, phase_of(s0))
            if not p.decoding:
                child(
                    "prefill_chunk",
                    p.start_s,
                    p.end_s,
                    phase_of(p.start_s),
                    **{"memorywall.position": p.position, "memorywall.tokens": p.tokens},
                )
            previous = p
        root.end(end_time=ns(end))


def resource() -> Resource:
    """The SDK's resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES), named memorywall
    unless those name it."""
    found = Resource.create()
    if str(found.attributes.get("service.name", "")).startswith("unknown_service"):
        return found.merge(Resource({"service.name": SERVICE_NAME}))
    return found


def _request_attributes(f: Finished) -> dict[str, Any]:
    # vLLM's span attributes (gen_ai.*), then the emulator's own; the LoRA adapter only on
    # a request that ran with one (an attribute cannot be None).
    lora = {} if f.lora is None else {"memorywall.lora": f.lora}
    return {
        "gen_ai.request.id": f.request_id,
        "gen_ai.usage.prompt_tokens": f.prompt_tokens,
        "gen_ai.usage.completion_tokens": f.completion_tokens,
        "gen_ai.latency.time_in_queue": f.queue_s,
        "gen_ai.latency.time_to_first_token": f.ttft_s,
        "gen_ai.latency.e2e": f.e2e_s,
        "gen_ai.latency.time_in_model_prefill": f.prefill_s,
        "gen_ai.latency.time_in_model_decode": f.decode_s,
        "memorywall.finish_reason": f.reason.value,
        "memorywall.cached_tokens": f.cached_tokens,
        "memorywall.preemptions": f.preemptions,
        "memorywall.energy_j": f.energy_j,
        "memorywall.host_stall_s": f.host_stall_s,
        "memorywall.kv_transfer_s": f.kv_transfer_s,
        "memorywall.modelled": True,
        **lora,
    }


def _extract(carrier: Any) -> Context | None:
    """The W3C trace context in `carrier` (headers or metadata), None if it carries none."""
    if carrier.get("traceparent") is None:
        return None
    return _PROPAGATOR.extract(carrier)


class _TraceInterceptor(grpc.aio.ServerInterceptor):
    """Reads `traceparent` metadata into the handler's context (each call runs in a task of
    its own, so nothing leaks between calls)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        if "traceparent" not in metadata:
            return handler
        parent = _extract(metadata)
        if handler.response_streaming:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                _PARENT.set(parent)
                responses = inner_stream(request, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    await responses.aclose()

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        inner_unary = handler.unary_unary

        async def unary_unary(request, context):
            _PARENT.set(parent)
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )


class TracedStream(EventIteration):
    """A stream that exports its request's spans when its `Finished` is read."""

    def __init__(
        self, inner: EventStream, tracing: Tracing, arrival_s: float, parent: Context | None
    ) -> None:
        self.request_id = inner.request_id
        self._inner = inner
        self._tracing = tracing
        self._arrival_s = arrival_s
        self._parent = parent

    @property
    def ended(self) -> bool:
        return self._inner.ended

    async def next_event(self) -> Event | None:
        event = await self._inner.next_event()
        if type(event) is Finished:
            self._tracing.export(event, self._arrival_s, self._parent)
        return event

    def close(self) -> None:
        self._inner.close()


class TracedEngine:
    """An `EngineClient` whose streams export their spans; everything else is the inner's."""

    def __init__(self, inner: EngineClient, tracing: Tracing) -> None:
        self._inner = inner
        self._tracing = tracing

    def submit(self, request, *, min_interval_s=0.0, arrival_s=None, fault=None) -> EventStream:
        inner = self._inner
        arrival = inner.now() if arrival_s is None else arrival_s
        stream = inner.submit(
            request, min_interval_s=min_interval_s, arrival_s=arrival, fault=fault
        )
        return TracedStream(stream, self._tracing, arrival, _PARENT.get())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _TracedDisaggregation:
    """A disaggregation role (`server/pd`) whose halves export their spans."""

    def __init__(self, pd: Any, tracing: Tracing) -> None:
        self._pd = pd
        self._tracing = tracing

    def submit(self, request, bootstrap, *, arrival_s=None, fault=None) -> EventStream:
        arrival = self._pd.engine.now() if arrival_s is None else arrival_s
        stream = self._pd.submit(request, bootstrap, arrival_s=arrival, fault=fault)
        return TracedStream(stream, self._tracing, arrival, _PARENT.get())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pd, name)
