"""`bench --otlp-endpoint`: the client side of a request's trace.

Each request the load generator sends opens a CLIENT span (`bench.request`), and
its W3C `traceparent` goes with the request (gRPC metadata, an HTTP header), so
a memorywall server started with `--otlp-endpoint` continues the same trace:
the client's wall-clock view and the server's modelled phases under one trace
id. Spans leave for an OTLP/HTTP collector through the SDK's batch processor;
the standard OTEL_* variables apply. Each worker process builds its own.

Imports the OpenTelemetry SDK (the `[otel]` extra), only when tracing is asked for.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from memorywall.errors import ConfigError

try:
    from opentelemetry import propagate, trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
except ImportError:  # pragma: no cover - depends on the install
    raise ConfigError(
        "--otlp-endpoint needs OpenTelemetry: pip install 'memorywall[otel]'"
    ) from None

SERVICE_NAME = "memorywall-bench"


def provider_for(exporter: SpanExporter) -> TracerProvider:
    """A provider batching to `exporter`, its resource the SDK's (OTEL_SERVICE_NAME,
    OTEL_RESOURCE_ATTRIBUTES), named memorywall-bench unless those name it."""
    found = Resource.create()
    if str(found.attributes.get("service.name", "")).startswith("unknown_service"):
        found = found.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=found)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def otlp_provider(endpoint: str) -> TracerProvider:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return provider_for(OTLPSpanExporter(endpoint=endpoint))


def inject(headers: dict[str, str]) -> None:
    """Add the current span's `traceparent` (and `tracestate`) to `headers`."""
    propagate.inject(headers)


class TraceMetadata(grpc.aio.UnaryStreamClientInterceptor):
    """Adds the current span's `traceparent` to every streaming call's metadata (the call's
    task copies the caller's context, so the span is the request's own)."""

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if carrier:
            metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()))
            for key, value in carrier.items():
                metadata.add(key, value)
            client_call_details = client_call_details._replace(metadata=metadata)
        return await continuation(client_call_details, request)


class TracedTarget:
    """A `Target` whose every request runs inside a CLIENT span of its own."""

    def __init__(self, inner: Any, provider: TracerProvider) -> None:
        self.inner = inner
        self.provider = provider
        self.tracer = provider.get_tracer("memorywall.loadgen")

    async def connect(self) -> None:
        await self.inner.connect()

    async def send(self, spec, record) -> None:
        attributes = {
            "memorywall.prompt_tokens": spec.prompt_tokens,
            "memorywall.output_tokens": spec.output_tokens,
        }
        with self.tracer.start_as_current_span(
            "bench.request", kind=trace.SpanKind.CLIENT, attributes=attributes
        ) as span:
            await self.inner.send(spec, record)
            if record.error is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, record.error))

    async def aclose(self) -> None:
        await self.inner.aclose()
        # Flushing waits on the exporter's thread: not on the event loop.
        await asyncio.to_thread(self.provider.shutdown)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
