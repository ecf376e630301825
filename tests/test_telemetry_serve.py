"""`memorywall serve --dcgm-port --otlp-endpoint` as a user runs it: the DCGM port in the ready
file, and every request's spans reaching a real OTLP/HTTP collector (a loopback receiver that
decodes what the SDK's exporter posts), with the OTEL_* variables honoured."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest

pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from memorywall.ready import ServerReady, wait_for
from memorywall.v1 import engine_pb2 as pb
from memorywall.v1 import engine_pb2_grpc

START_TIMEOUT_S = 60.0
REQUESTS = 5


class Collector(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver on loopback: keeps every decoded export request."""

    def __init__(self) -> None:
        self.exports: list[ExportTraceServiceRequest] = []
        self.paths: list[str] = []
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                message = ExportTraceServiceRequest()
                message.ParseFromString(body)
                collector.exports.append(message)
                collector.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def spans(self) -> list[tuple[str, object]]:
        """(service.name, span) for every span received."""
        out = []
        for export in self.exports:
            for resource_spans in export.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    out.extend((attrs.get("service.name"), s) for s in scope.spans)
        return out


def test_every_request_reaches_the_collector_and_the_ready_file_names_the_dcgm_port(tmp_path):
    collector = Collector()
    thread = threading.Thread(target=collector.serve_forever, daemon=True)
    thread.start()
    ready_file = tmp_path / "ready.json"
    env = {**os.environ, "OTEL_SERVICE_NAME": "wafer-under-test"}
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    argv = ["--hardware", "wse-3", "--model", "llama-3.1-8b", "--port", "0"]
    argv += ["--dcgm-port", "0", "--otlp-endpoint", endpoint, "--ready-file", str(ready_file)]
    with open(tmp_path / "stderr.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "memorywall", "serve", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
        )
    try:
        ready = ServerReady.from_dict(wait_for(ready_file, process, timeout_s=START_TIMEOUT_S))
        assert ready.dcgm_port and ready.dcgm_url.endswith(f":{ready.dcgm_port}/metrics")
        with urllib.request.urlopen(ready.dcgm_url, timeout=10) as response:
            text = response.read().decode()
        assert 'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0"' in text
        with grpc.insecure_channel(ready.grpc_target) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            for i in range(REQUESTS):
                request = pb.GenerateRequest(
                    request_id=f"r{i}", token_count=100, max_tokens=4, ignore_eos=True
                )
                list(stub.Generate(request, timeout=30))
        process.send_signal(signal.SIGTERM)  # the shutdown flushes the batched spans
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        collector.shutdown()
        collector.server_close()
    assert set(collector.paths) == {"/v1/traces"}
    spans = collector.spans()
    roots = [s for _, s in spans if s.name == "request"]
    ids = {
        a.value.string_value for s in roots for a in s.attributes if a.key == "gen_ai.request.id"
    }
    assert ids == {f"r{i}" for i in range(REQUESTS)}
    assert {service for service, _ in spans} == {"wafer-under-test"}
    assert {s.name for _, s in spans} >= {"request", "queue", "prefill", "prefill_chunk", "decode"}


def test_tracing_is_refused_with_several_api_servers():
    result = subprocess.run(
        [sys.executable, "-m", "memorywall", "serve", "--hardware", "wse-3", "--model",
         "llama-3.1-8b", "--api-servers", "2", "--otlp-endpoint", "http://127.0.0.1:4318"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--api-servers" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _energy_j(text: str) -> tuple[float, float]:
    """(DCGM energy over every device in J, or memorywall:modelled_energy_joules) of a scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.name == "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION":
                total += sample.value / 1e3
            elif sample.name == "memorywall:modelled_energy_joules_total":
                total += sample.value
    return total


def test_the_engine_process_serves_dcgm_with_several_api_servers(tmp_path):
    """`--api-servers 2`: the engine process binds the DCGM port; over a load its energy
    counters grow by the engine's modelled energy, whichever front served the requests."""
    ready_file = tmp_path / "ready.json"
    argv = ["--hardware", "h100-sxm", "--model", "llama-3.1-8b", "--devices", "2"]
    argv += ["--port", "0", "--http-port", "0", "--api-servers", "2", "--dcgm-port", "0"]
    with open(tmp_path / "stderr.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "memorywall", "serve", *argv, "--ready-file", str(ready_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        ready = ServerReady.from_dict(wait_for(ready_file, process, timeout_s=START_TIMEOUT_S))
        assert ready.dcgm_port not in (None, ready.http_port, ready.grpc_port)

        def scrape(url: str) -> float:
            with urllib.request.urlopen(url, timeout=10) as response:
                return _energy_j(response.read().decode())

        dcgm_before, engine_before = scrape(ready.dcgm_url), scrape(ready.metrics_url)
        with grpc.insecure_channel(ready.grpc_target) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            for _ in range(REQUESTS):
                request = pb.GenerateRequest(token_count=300, max_tokens=20, ignore_eos=True)
                list(stub.Generate(request, timeout=30))
        dcgm_grown = scrape(ready.dcgm_url) - dcgm_before
        engine_grown = scrape(ready.metrics_url) - engine_before
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert engine_grown > 0
    assert dcgm_grown == pytest.approx(engine_grown, rel=0.01)
