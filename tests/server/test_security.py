"""TLS and the API key on both fronts, end to end on 127.0.0.1 with certificates made here
(a throwaway CA, a server certificate for 127.0.0.1, a client certificate): our clients and
the official `openai` client, the 401 / UNAUTHENTICATED answers, open health and metrics,
client certificates, and the warning for a server exposed beyond loopback."""

from __future__ import annotations

import argparse
import asyncio
import ssl
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from pki import Pki, make_pki

from memorywall.cli.serve_options import add_arguments, server_options
from memorywall.client import AsyncClient, Client, Tls, Unauthenticated, Unavailable
from memorywall.errors import ConfigError
from memorywall.loadgen.cli import grpc_server_facts, openai_server_facts
from memorywall.loadgen.records import RequestRecord, RequestSpec
from memorywall.loadgen.target import Access, Backend, TargetConfig, make_target
from memorywall.server.app import EmulatorServer, ServerConfig, exposure_risk
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.fronts.auth import bearer_matches
from memorywall.server.fronts.tls import TlsConfig

TIMEOUT_S = 10.0
KEY = "sk-test-0123456789"
MODEL = "llama-3.1-8b"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def secured(wse3_8b, pki) -> AsyncIterator[EmulatorServer]:
    tls = TlsConfig(cert=pki.server_cert, key=pki.server_key)
    config = ServerConfig(port=0, http_port=0, tls=tls, api_key=KEY, load_format="dummy")
    server = EmulatorServer(wse3_8b, EngineConfig(), config)
    await server.start()
    yield server
    await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


def _ssl(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca))


# --- gRPC: our clients ------------------------------------------------------------------


async def test_our_async_client_over_tls_with_the_key(secured, pki):
    async with AsyncClient(secured.target, tls=Tls(ca=pki.ca), api_key=KEY) as client:
        result = await client.complete(prompt_tokens=16, max_tokens=4, ignore_eos=True)
        assert result.usage.completion_tokens == 4
        info = await client.server_info()
        assert info.requests_finished >= 1


async def test_grpc_refuses_a_missing_or_wrong_key_but_health_is_open(secured, pki):
    for key in (None, "sk-wrong", KEY + "x"):
        async with AsyncClient(secured.target, tls=Tls(ca=pki.ca), api_key=key) as client:
            with pytest.raises(Unauthenticated, match="API key"):
                await client.complete(prompt_tokens=16, max_tokens=4)
            with pytest.raises(Unauthenticated):
                await client.model_info()
            assert await client.health() is True  # probes need no key
    assert secured.engine.stats().requests_finished == 0


async def test_our_sync_client_over_tls(secured, pki):
    def call() -> int:  # in a thread: the server runs on this loop
        with Client(secured.target, tls=Tls(ca=pki.ca), api_key=KEY, timeout_s=TIMEOUT_S) as c:
            result = c.complete(prompt_tokens=8, max_tokens=2, ignore_eos=True)
            return result.usage.completion_tokens

    assert await asyncio.to_thread(call) == 2


async def test_plaintext_and_untrusted_clients_cannot_talk_to_a_tls_port(secured, pki, tmp_path):
    async with AsyncClient(secured.target, api_key=KEY, timeout_s=3) as plain:
        with pytest.raises(Unavailable):
            await plain.complete(prompt_tokens=8, max_tokens=2)
    # The system's roots do not know the test CA.
    async with AsyncClient(secured.target, tls=Tls(), api_key=KEY, timeout_s=3) as untrusted:
        with pytest.raises(Unavailable):
            await untrusted.complete(prompt_tokens=8, max_tokens=2)


# --- HTTP: the official openai client ---------------------------------------------------


async def test_openai_client_over_https_with_the_key(secured, pki):
    async with openai.DefaultAsyncHttpxClient(verify=_ssl(pki)) as http:
        client = openai.AsyncOpenAI(
            base_url=f"{secured.http_url}/v1", api_key=KEY, http_client=http
        )
        completion = await client.completions.create(
            model=MODEL, prompt="hello", max_tokens=4, extra_body={"ignore_eos": True}
        )
        assert completion.usage.completion_tokens == 4
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert len(text.split()) == 3  # one word a token; chunks may carry several


async def test_http_answers_401_with_an_openai_error_without_the_key(secured, pki):
    async with openai.DefaultAsyncHttpxClient(verify=_ssl(pki)) as http:
        client = openai.AsyncOpenAI(
            base_url=f"{secured.http_url}/v1", api_key="sk-wrong", http_client=http, max_retries=0
        )
        with pytest.raises(openai.AuthenticationError) as e:
            await client.completions.create(model=MODEL, prompt="hello", max_tokens=4)
        assert e.value.status_code == 401
        assert e.value.body["code"] == 401 and "API key" in e.value.body["message"]
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    connector = aiohttp.TCPConnector(ssl=_ssl(pki))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(f"{secured.http_url}/v1/completions", json={}) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        # Load balancers and Prometheus need no key (vLLM's policy, stated in the README).
        for path in ("/health", "/metrics", "/version"):
            async with session.get(f"{secured.http_url}{path}") as r:
                assert r.status == 200, path
    assert secured.engine.stats().requests_finished == 0


async def test_plain_http_to_a_tls_port_fails(secured):
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(secured.http_url.replace("https", "http") + "/health") as r:
                await r.read()


# --- client certificates ----------------------------------------------------------------


async def test_client_certificates_are_required_when_a_client_ca_is_given(wse3_8b, pki):
    tls = TlsConfig(cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca)
    server = EmulatorServer(
        wse3_8b, EngineConfig(), ServerConfig(port=0, http_port=0, tls=tls, load_format="dummy")
    )
    await server.start()
    try:
        mutual = Tls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        async with AsyncClient(server.target, tls=mutual) as client:
            assert (await client.complete(prompt_tokens=8, max_tokens=2)).usage.completion_tokens
        async with AsyncClient(server.target, tls=Tls(ca=pki.ca), timeout_s=3) as anonymous:
            with pytest.raises(Unavailable):
                await anonymous.complete(prompt_tokens=8, max_tokens=2)
        with_cert = _ssl(pki)
        with_cert.load_cert_chain(pki.client_cert, pki.client_key)
        for context, ok in ((with_cert, True), (_ssl(pki), False)):
            connector = aiohttp.TCPConnector(ssl=context)
            async with aiohttp.ClientSession(connector=connector) as session:
                try:
                    async with session.get(f"{server.http_url}/health") as r:
                        assert ok and r.status == 200
                except aiohttp.ClientError:
                    assert not ok
    finally:
        await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


# --- configuration ----------------------------------------------------------------------


def test_exposure_beyond_loopback_is_named(pki):
    tls = TlsConfig(cert=pki.server_cert, key=pki.server_key)
    assert exposure_risk(ServerConfig(host="127.0.0.1")) is None
    assert exposure_risk(ServerConfig(host="::1")) is None
    assert exposure_risk(ServerConfig(host="localhost")) is None
    both = exposure_risk(ServerConfig(host="0.0.0.0"))
    assert "without TLS" in both and "without an API key" in both
    no_key = exposure_risk(ServerConfig(host="10.1.2.3", tls=tls))
    assert "without TLS" not in no_key and "without an API key" in no_key
    assert exposure_risk(ServerConfig(host="0.0.0.0", tls=tls, api_key=KEY)) is None


def test_serve_options_read_the_key_from_the_environment_and_check_tls_pairs(pki, monkeypatch):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("MEMORYWALL_API_KEY", "from-env")
    assert server_options(parser.parse_args([]))["api_key"] == "from-env"
    assert server_options(parser.parse_args(["--api-key", "flag"]))["api_key"] == "flag"
    monkeypatch.delenv("MEMORYWALL_API_KEY")
    assert server_options(parser.parse_args([]))["api_key"] is None
    with pytest.raises(ConfigError, match="go together"):
        server_options(parser.parse_args(["--tls-cert", str(pki.server_cert)]))
    with pytest.raises(ConfigError, match="no such file"):
        server_options(parser.parse_args(["--tls-cert", "/nope.pem", "--tls-key", "/nope.key"]))
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    assert server_options(parser.parse_args(args))["tls"].cert == pki.server_cert


def test_bearer_check():
    assert bearer_matches(f"Bearer {KEY}", KEY) and bearer_matches(f"bearer  {KEY} ", KEY)
    for value in (None, KEY, f"Basic {KEY}", f"Bearer {KEY[:-1]}", "Bearer ", ""):
        assert not bearer_matches(value, KEY), value
    with pytest.raises(ConfigError, match="both cert and key"):
        Tls(cert="x.pem")


# --- the load generator -----------------------------------------------------------------


async def test_bench_targets_speak_tls_and_pass_the_key(secured, pki):
    for backend, address in (
        (Backend.MEMORYWALL_GRPC, secured.target),
        (Backend.OPENAI_COMPLETIONS, secured.http_url),
        (Backend.OPENAI_CHAT, secured.http_url),
    ):
        for key, ok in ((KEY, True), ("sk-wrong", False)):
            access = Access(tls=True, tls_ca=str(pki.ca), api_key=key)
            config = TargetConfig(backend=backend, address=address, model=MODEL, access=access)
            target = make_target(config, timeout_s=TIMEOUT_S)
            spec = RequestSpec(0, 16, 4)
            record = RequestRecord(0, 16, 4, None, 0)
            await target.connect()
            try:
                await target.send(spec, record)
            finally:
                await target.aclose()
            if ok:
                assert record.ok and record.completion_tokens == 4, (backend, record.error)
            else:
                assert not record.ok and record.error.startswith(("UNAUTHENTICATED", "HTTP 401")), (
                    backend,
                    record.error,
                )
    facts = await asyncio.to_thread(
        grpc_server_facts, secured.target, Access(tls_ca=str(pki.ca), api_key=KEY)
    )
    assert facts.emulated and facts.hardware == "wse-3"
    facts = await asyncio.to_thread(
        openai_server_facts, secured.http_url, None, Access(tls_ca=str(pki.ca), api_key=KEY)
    )
    assert facts.emulated and facts.model == MODEL
