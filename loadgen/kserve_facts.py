"""What a KServe v2 / Triton server says about itself, before any load.

The model: `--model`, else the first READY model of Triton's repository index
(POST /v2/repository/index, gRPC RepositoryIndex). The server counts as the
memorywall emulator when its server metadata is named "memorywall"; the model's
config then names the emulated hardware and device count (`memorywall_hardware`,
`memorywall_devices` config parameters) for the core's prediction.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from memorywall.kserve import grpc_service_pb2 as pb
from memorywall.kserve import grpc_service_pb2_grpc
from memorywall.loadgen.bench import ServerFacts
from memorywall.loadgen.openai_target import aiohttp_ssl
from memorywall.loadgen.target import Access, Backend

TIMEOUT_S = 5.0
EMULATOR_NAME = "memorywall"


class KServeUnreachable(Exception):
    """No usable KServe v2 server at the target."""


def facts_of(name: str, model: str, parameters: dict[str, str]) -> ServerFacts:
    if name != EMULATOR_NAME:
        return ServerFacts(model=model, emulated=False)
    devices = parameters.get("memorywall_devices", "1")
    return ServerFacts(
        hardware=parameters.get("memorywall_hardware"),
        model=model,
        devices=int(devices) if devices.isdigit() and int(devices) > 0 else 1,
        emulated=True,
    )


def pick_model(index: list[tuple[str, str]], target: str) -> str:
    """The first READY model of a repository index."""
    ready = [name for name, state in index if state in ("READY", "")]
    if not ready:
        raise KServeUnreachable(f"no READY model at {target}; name one with --model")
    return ready[0]


async def _grpc_facts(target: str, model: str | None, access: Access) -> ServerFacts:
    tls = access.grpc_tls()
    if tls is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        roots = Path(tls.ca).read_bytes() if tls.ca else None
        channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(roots))
    metadata = (("authorization", f"Bearer {access.api_key}"),) if access.api_key else ()
    async with channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        kw: dict[str, Any] = {"timeout": TIMEOUT_S, "metadata": metadata}
        server = await stub.ServerMetadata(pb.ServerMetadataRequest(), **kw)
        if model is None:
            index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), **kw)
            model = pick_model([(m.name, m.state) for m in index.models], target)
        parameters: dict[str, str] = {}
        if server.name == EMULATOR_NAME:
            config = await stub.ModelConfig(pb.ModelConfigRequest(name=model), **kw)
            parameters = {k: v.string_value for k, v in config.config.parameters.items()}
    return facts_of(server.name, model, parameters)


async def _http_facts(base: str, model: str | None, access: Access) -> ServerFacts:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    headers = access.headers()
    connector = aiohttp.TCPConnector(ssl=aiohttp_ssl(access))
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as s:
        async with s.get(f"{base}/v2", headers=headers) as r:
            r.raise_for_status()
            server = await r.json()
        if model is None:
            async with s.post(f"{base}/v2/repository/index", headers=headers, json={}) as r:
                r.raise_for_status()
                entries = await r.json()
            index = [(e.get("name", ""), e.get("state", "")) for e in entries]
            model = pick_model(index, base)
        parameters: dict[str, str] = {}
        name = server.get("name") if isinstance(server, dict) else None
        if name == EMULATOR_NAME:
            async with s.get(f"{base}/v2/models/{model}/config", headers=headers) as r:
                r.raise_for_status()
                config = await r.json()
            parameters = {
                k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()
            }
    return facts_of(name or "", model, parameters)


def kserve_server_facts(
    backend: Backend, target: str, model: str | None, access: Access | None = None
) -> ServerFacts:
    """Ask the server at `target` (host:port for gRPC, a base URL for HTTP) what it is."""
    access = access or Access()
    try:
        if backend is Backend.KSERVE_GRPC:
            return asyncio.run(_grpc_facts(target, model, access))
        return asyncio.run(_http_facts(target, model, access))
    except grpc.aio.AioRpcError as e:
        raise KServeUnreachable(
            f"cannot use a KServe v2 server at {target}: {e.code().name} {e.details()}"
        ) from None
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as e:
        raise KServeUnreachable(
            f"cannot use a KServe v2 server at {target}: {str(e) or type(e).__name__}"
        ) from None
