"""The dashboard watching a worker behind TLS with a private CA and an API key
(`dashboard --tls-ca`, `--api-key`): scraped and described with them, down without the CA,
unnamed without the key; a bad CA file is a one-line error."""

from __future__ import annotations

import asyncio

import pytest
from pki import make_pki

from memorywall.cli.app import main
from memorywall.dashboard.site import http_poller
from memorywall.dashboard.sources import Access, target_from_url, tls_context
from memorywall.server.app import EmulatorServer
from memorywall.server.config import ServerConfig
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.fronts.tls import TlsConfig

KEY = "sk-dashboard-test"
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def secured(wse3_8b, pki):
    tls = TlsConfig(cert=pki.server_cert, key=pki.server_key)
    config = ServerConfig(
        port=0, http_port=0, tls=tls, api_key=KEY, load_format="dummy", grpc=False
    )
    server = EmulatorServer(wse3_8b, EngineConfig(), config)
    await server.start()
    yield server
    await asyncio.wait_for(server.stop(grace_s=0.0), TIMEOUT_S)


async def _column(url: str, access: Access) -> dict:
    poller = http_poller([target_from_url(url)], access=access)
    try:
        await asyncio.wait_for(poller.poll_once(), TIMEOUT_S)
        [worker] = poller.snapshot()["workers"]
    finally:
        await poller.close()
    return worker


async def test_a_worker_behind_tls_and_a_key_is_read_with_both(secured, pki):
    url = secured.http_url
    assert url.startswith("https://")
    both = await _column(url, Access(ssl=tls_context(pki.ca), api_key=KEY))
    assert (both["up"], both["hardware"], both["model"]) == (True, "wse-3", "llama-3.1-8b")
    # /metrics is open, /v1/models is not: without the key the column is up but unnamed.
    keyless = await _column(url, Access(ssl=tls_context(pki.ca)))
    assert (keyless["up"], keyless["hardware"]) == (True, None)
    # The system's roots do not know the private CA: the worker shows down, and why.
    untrusted = await _column(url, Access(api_key=KEY))
    assert not untrusted["up"]
    assert untrusted["error"]


def test_an_unreadable_ca_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    for path in (bad, tmp_path / "missing.pem"):
        assert main(["dashboard", "--worker", "https://127.0.0.1:1", "--tls-ca", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"memorywall: error: --tls-ca: cannot read {path}")
        assert err.count("\n") == 1
