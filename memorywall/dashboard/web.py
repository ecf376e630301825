"""The dashboard's HTTP side: the page, its script and style, and the JSON snapshot.

`dashboard_app(poller)` is an aiohttp application that runs the poller while it serves:
`/` the page, `/dashboard.js` and `/dashboard.css` its assets (package data, no build
step), `/api/snapshot` the poller's JSON. Every URL in the page is relative, so the same
application serves at the root of its own port (`memorywall dashboard`) or under a path
of a worker's HTTP front (`serve --dashboard`, mounted by `mount`).
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib import resources

from aiohttp import web

from memorywall.dashboard.poller import Poller

POLLER_KEY = web.AppKey("poller", Poller)
TASK_KEY = web.AppKey("poll_task", asyncio.Task)
# The assets, by URL path: file name and content type.
ASSETS = {
    "/": ("index.html", "text/html"),
    "/dashboard.js": ("dashboard.js", "text/javascript"),
    "/dashboard.css": ("dashboard.css", "text/css"),
}
MOUNT_PATH = "/dashboard/"  # where `serve --dashboard` serves it on the HTTP front


def asset(name: str) -> bytes:
    """One of the static files shipped in the package."""
    return resources.files("memorywall.dashboard").joinpath("static", name).read_bytes()


def dashboard_app(poller: Poller, *, poll: bool = True) -> web.Application:
    """The page, its assets and the snapshot, with `poller` running while it serves
    (`poll=False`: the caller polls, as tests do on a fake clock)."""
    app = web.Application()
    app[POLLER_KEY] = poller
    for path, (name, content_type) in ASSETS.items():
        app.router.add_get(path, _asset_handler(name, content_type))
    app.router.add_get("/api/snapshot", _snapshot)
    if poll:
        app.on_startup.append(_start_polling)
        app.on_cleanup.append(_stop_polling)
    return app


def mount(parent: web.Application, poller: Poller, path: str = MOUNT_PATH) -> None:
    """Serve the dashboard under `path` of `parent` (with `path` minus its slash sending
    the browser there, so relative URLs resolve)."""
    bare = path.rstrip("/")

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(path)

    # Before the sub-application: its prefix resource would take the bare path too.
    parent.router.add_get(bare, redirect)
    parent.add_subapp(path, dashboard_app(poller))


def _asset_handler(name: str, content_type: str):
    body = asset(name)  # read once: they are small and never change while serving

    async def handle(request: web.Request) -> web.Response:
        return web.Response(
            body=body,
            content_type=content_type,
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    return handle


async def _snapshot(request: web.Request) -> web.Response:
    poller = request.app[POLLER_KEY]
    return web.json_response(poller.snapshot(), headers={"Cache-Control": "no-store"})


async def _start_polling(app: web.Application) -> None:
    app[TASK_KEY] = asyncio.get_running_loop().create_task(app[POLLER_KEY].run())


async def _stop_polling(app: web.Application) -> None:
    task = app[TASK_KEY]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await app[POLLER_KEY].close()
