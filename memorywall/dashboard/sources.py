"""Where the dashboard reads each worker: its `/metrics` over HTTP, or in-process.

A `Target` names a worker and where its metrics are; `targets_from_urls` and
`targets_from_fleet` build them from `memorywall dashboard`'s options. An `HttpSource`
scrapes a target with aiohttp and learns the emulated hardware from the worker's
`/v1/models` (memorywall's `hardware` and `devices` fields) when nobody said; a
`LocalSource` renders the metrics of the server it runs in (`serve --dashboard`).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from memorywall.errors import ConfigError
from memorywall.ready import ReadyError, ServerReady

SCRAPE_TIMEOUT_S = 2.0


@dataclass(frozen=True, kw_only=True)
class Target:
    """One worker, as a column: its name, what it emulates (None until known), where its
    metrics are, and where it says what it emulates (None: nowhere)."""

    name: str
    metrics_url: str | None = None
    models_url: str | None = None
    hardware: str | None = None
    model: str | None = None
    devices: int | None = None


class Source(Protocol):
    """A worker the poller reads: its target, and its metrics text when asked."""

    target: Target

    async def read(self) -> str: ...

    async def describe(self) -> None: ...

    async def close(self) -> None: ...


def target_from_url(url: str) -> Target:
    """A worker given by URL: its HTTP front (`http://host:port`, whose /metrics and
    /v1/models are read) or a metrics URL (`.../metrics`); ConfigError if it is not one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--worker: expected http(s)://host:port, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"--worker: bad port in {url!r}") from None
    name = f"{parts.hostname}:{port}" if port is not None else parts.hostname
    path = parts.path.rstrip("/")
    base = f"{parts.scheme}://{parts.netloc}"
    if path.endswith("/metrics"):
        prefix = path.removesuffix("/metrics")
        return Target(name=name, metrics_url=base + path, models_url=f"{base}{prefix}/v1/models")
    if path:
        raise ConfigError(f"--worker: expected a base URL or a /metrics URL, got {url!r}")
    return Target(name=name, metrics_url=f"{base}/metrics", models_url=f"{base}/v1/models")


def target_from_ready(name: str, ready: ServerReady) -> Target:
    """A worker from what its ready file says (`memorywall serve --ready-file`)."""
    return Target(
        name=name,
        metrics_url=ready.metrics_url,
        hardware=ready.hardware,
        model=ready.model,
        devices=ready.devices,
    )


def targets_from_fleet(path: Path) -> list[Target]:
    """Every worker of a fleet's ready file (`memorywall fleet --ready-file`), in its order;
    ConfigError if the file is missing or not a fleet's."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"--fleet: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"--fleet: {path} is not JSON ({e})") from None
    workers = data.get("workers") if isinstance(data, dict) else None
    if not isinstance(workers, list) or not workers:
        raise ConfigError(f"--fleet: {path} lists no workers (not a fleet's ready file?)")
    targets = []
    for i, entry in enumerate(workers):
        name = entry.get("name", f"worker[{i}]") if isinstance(entry, dict) else f"worker[{i}]"
        try:
            ready = ServerReady.from_dict(entry, f"--fleet: {path}: {name}")
        except (ReadyError, TypeError) as e:
            raise ConfigError(str(e)) from None
        if ready.metrics_url is None:
            raise ConfigError(f"--fleet: worker {name} serves no /metrics (no HTTP port)")
        targets.append(target_from_ready(str(name), ready))
    return targets


def described(target: Target, models: object) -> Target:
    """`target` with the hardware, model and devices a `/v1/models` body names (memorywall's
    extension fields); what the body lacks, or gets wrong, stays as it was."""
    data = models.get("data") if isinstance(models, dict) else None
    card = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    hardware, model, devices = card.get("hardware"), card.get("id"), card.get("devices")
    return replace(
        target,
        hardware=hardware if isinstance(hardware, str) else target.hardware,
        model=model if isinstance(model, str) else target.model,
        devices=devices if isinstance(devices, int) and devices > 0 else target.devices,
    )


class HttpSource:
    """A worker's /metrics over HTTP, on one shared aiohttp session."""

    def __init__(self, target: Target, session: aiohttp.ClientSession) -> None:
        self.target = target
        self.session = session
        self._described = target.hardware is not None or target.models_url is None

    async def read(self) -> str:
        if self.target.metrics_url is None:
            raise OSError("no metrics URL")
        async with self.session.get(self.target.metrics_url) as response:
            if response.status != 200:
                raise OSError(f"/metrics answered HTTP {response.status}")
            return await response.text()

    async def describe(self) -> None:
        """Learn the hardware, model and devices from /v1/models, once it answers."""
        if self._described or self.target.models_url is None:
            return
        async with self.session.get(self.target.models_url) as response:
            self._described = True  # an answer, even 404 (a metrics-only port), is final
            if response.status != 200:
                return
            body = await response.json(content_type=None)
        self.target = described(self.target, body)

    async def close(self) -> None:
        """The session is the poller's to close."""


class LocalSource:
    """The metrics of the server the dashboard runs in: `render` returns its /metrics text
    (call on the server's event loop, where the metrics are fed)."""

    def __init__(self, target: Target, render: Callable[[], str]) -> None:
        self.target = target
        self.render = render

    async def read(self) -> str:
        return self.render()

    async def describe(self) -> None:
        """Its target is complete: the server knows what it emulates."""

    async def close(self) -> None:
        """Nothing held."""


@dataclass(frozen=True, kw_only=True)
class Access:
    """What workers behind TLS or an API key need (`dashboard --tls-ca`, `--api-key`).

    `ssl`: the context that checks their certificates (None: the system's roots);
    `api_key`: sent as a bearer token (/metrics is open on a memorywall worker, but
    /v1/models, where the dashboard learns the hardware, is behind the key)."""

    ssl: ssl.SSLContext | None = None
    api_key: str | None = None


def tls_context(ca: Path) -> ssl.SSLContext:
    """A client context trusting the PEM roots in `ca`; ConfigError if they cannot be read."""
    try:
        return ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"--tls-ca: cannot read {ca}: {getattr(e, 'strerror', None) or e}"
        ) from None


OPEN = Access()  # plain HTTP, or the system's roots, no key


def http_session(access: Access = OPEN) -> aiohttp.ClientSession:
    """The session HTTP sources share: a short timeout, so one slow worker cannot hold up
    a poll round for long; `access` for workers behind TLS or a key."""
    headers = {"Authorization": f"Bearer {access.api_key}"} if access.api_key else None
    connector = aiohttp.TCPConnector(ssl=access.ssl) if access.ssl is not None else None
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S), headers=headers, connector=connector
    )
