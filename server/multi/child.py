"""What each child process of `serve --api-servers N` sets up first."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Callable

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """The parent's log format and level, on the stderr the child shares with it."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def watch_parent(loop: asyncio.AbstractEventLoop, on_exit: Callable[[], None]) -> None:
    """Call `on_exit` once the parent process is gone (killed before it could stop us)."""
    parent = multiprocessing.parent_process()
    if parent is not None:

        def gone() -> None:
            loop.remove_reader(parent.sentinel)
            on_exit()

        loop.add_reader(parent.sentinel, gone)
