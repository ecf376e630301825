"""Running the dashboard on a port of its own: in an event loop, or in a thread beside
a program that has none (`memorywall demo --dashboard`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

from aiohttp import web

from memorywall.dashboard.poller import DEFAULT_CONFIG, Poller, PollerConfig
from memorywall.dashboard.sources import OPEN, Access, HttpSource, Target, http_session
from memorywall.dashboard.web import dashboard_app

SHUTDOWN_TIMEOUT_S = 1.0


def http_poller(
    targets: Sequence[Target], config: PollerConfig = DEFAULT_CONFIG, access: Access = OPEN
) -> Poller:
    """A poller that scrapes `targets` over HTTP on one session (build it in the event loop
    that runs it: the session binds to that loop)."""
    session = http_session(access)
    return Poller([HttpSource(t, session) for t in targets], config, session=session)


class DashboardSite:
    """The dashboard bound to host:port (0: any free port); `start` returns its URL."""

    def __init__(self, poller: Poller) -> None:
        self.runner = web.AppRunner(
            dashboard_app(poller), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        self.url = ""
        self.port = 0

    async def start(self, host: str, port: int) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            raise OSError(
                f"cannot serve the dashboard on {host}:{port}: {e.strerror or e}"
            ) from None
        self.port = self.runner.addresses[0][1]
        self.url = f"http://{host}:{self.port}/"
        return self.url

    async def stop(self) -> None:
        await self.runner.cleanup()


class DashboardThread:
    """A `DashboardSite` on its own event loop in a daemon thread: `start` blocks until it
    serves (returning its URL) or raises what stopped it; `stop` ends it and joins."""

    def __init__(self, targets: Sequence[Target], config: PollerConfig = DEFAULT_CONFIG) -> None:
        self.targets = list(targets)
        self.config = config
        self.url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 10.0) -> str:
        started = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._done = asyncio.Event()
            site = DashboardSite(http_poller(self.targets, self.config))
            try:
                self.url = await site.start(host, port)
            except BaseException as e:
                failure.append(e)
                started.set()
                return
            started.set()
            try:
                await self._done.wait()
            finally:
                await site.stop()

        self._thread = threading.Thread(
            target=asyncio.run, args=(serve(),), name="dashboard", daemon=True
        )
        self._thread.start()
        if not started.wait(timeout_s):
            raise OSError(f"the dashboard did not start within {timeout_s:g} s")
        if failure:
            self._thread.join()
            raise failure[0]
        assert self.url is not None
        return self.url

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread is None or self._loop is None or self._done is None:
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._done.set)
            self._thread.join(timeout_s)
        self._thread = None
