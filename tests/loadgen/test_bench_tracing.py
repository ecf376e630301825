"""`bench --otlp-endpoint`: each request opens a client span and sends its traceparent; a
traced server continues that trace over gRPC and HTTP."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from memorywall.loadgen.cli import BenchError, _otlp
from memorywall.loadgen.records import RequestRecord, RequestSpec
from memorywall.loadgen.target import Access, Backend, TargetConfig, _make_target
from memorywall.loadgen.tracing import TracedTarget, provider_for
from memorywall.server.app import EmulatorServer, ServerConfig
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.fronts.tracing import Tracing

TIMEOUT_S = 20.0


@pytest.mark.parametrize("backend", [Backend.MEMORYWALL_GRPC, Backend.OPENAI_COMPLETIONS])
async def test_the_server_continues_the_benchs_trace(wse3_8b, backend):
    server_spans = InMemorySpanExporter()
    server = EmulatorServer(
        wse3_8b,
        EngineConfig(),
        ServerConfig(port=0, http_port=0),
        tracing=Tracing.with_exporter(server_spans, batch=False),
    )
    await server.start()
    client_spans = InMemorySpanExporter()
    try:
        address = server.target if backend is Backend.MEMORYWALL_GRPC else server.http_url
        config = TargetConfig(
            backend=backend,
            address=address,
            model=server.card.model,
            access=Access(otlp_endpoint="http://unused:4318/v1/traces"),
        )
        target = TracedTarget(_make_target(config, timeout_s=TIMEOUT_S), provider_for(client_spans))
        await target.connect()
        records = []
        for i in range(3):
            record = RequestRecord(i, 50, 4, scheduled_ns=None, sent_ns=0)
            records.append(record)
            await asyncio.wait_for(target.send(RequestSpec(i, 50, 4), record), TIMEOUT_S)
        await target.aclose()  # flushes the client's spans
    finally:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)
    assert all(r.error is None for r in records)
    clients = client_spans.get_finished_spans()
    roots = [s for s in server_spans.get_finished_spans() if s.name == "request"]
    assert len(clients) == len(roots) == 3
    by_trace = {c.context.trace_id: c for c in clients}
    assert len(by_trace) == 3  # a trace per request
    for root in roots:
        client = by_trace[root.context.trace_id]
        assert root.parent.span_id == client.context.span_id
        assert client.name == "bench.request"


def test_the_flag_without_the_extra_is_a_one_line_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BenchError, match=r"pip install 'memorywall\[otel\]'"):
        _otlp("http://127.0.0.1:4318/v1/traces")
    assert _otlp(None) is None
