"""Stop signals for a server's asyncio loop, removed before the loop closes.

Python 3.11's unix event loop closes its self-pipe before it removes its signal
handlers, so a SIGTERM arriving in between (a parent stopping its children, a
second Ctrl-C) makes the C handler write to a closed fd and print "Exception
ignored when trying to write to the signal wakeup fd" on the way out. Removing
the handlers first, and ignoring the signals for the last moments of teardown
(the server is stopping already), leaves nothing to print.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def on_stop_signals(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None]
) -> Iterator[None]:
    """Call `callback` on SIGINT or SIGTERM while the block runs; ignore them after."""
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, callback)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
