"""The dashboard's poller: scrapes every worker each interval and keeps what the page shows.

Per worker it keeps the scrapes of the last window (rates and recent quantiles are their
difference, `derive.figures`) and a short history of figures for the sparklines. One
worker that is down does not stop the others: its column says why. `snapshot` is the JSON
the page fetches.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from memorywall.dashboard.derive import Figures, figures, is_reset
from memorywall.dashboard.scrape import Scrape, parse
from memorywall.dashboard.sources import Source

# The figures each worker keeps a history of, for the sparklines.
HISTORY_KEYS = (
    "tokens_per_s",
    "tokens_per_s_per_user",
    "ttft_p50_s",
    "itl_mean_s",
    "running",
    "kv_usage",
    "power_w",
    "energy_per_token_j",
    "lag_p99_s",
)


@dataclass(frozen=True, kw_only=True)
class PollerConfig:
    interval_s: float = 1.0  # between scrapes
    window_s: float = 5.0  # rates and quantiles over this much of the recent past
    history: int = 120  # points kept per sparkline


DEFAULT_CONFIG = PollerConfig()


@dataclass
class _Worker:
    source: Source
    scrapes: deque[Scrape] = field(default_factory=deque)
    history: deque[tuple[float, Figures]] = field(default_factory=deque)
    latest: Figures | None = None
    error: str | None = None
    polls: int = 0  # successful scrapes, all told


class Poller:
    """Scrapes `sources` every `config.interval_s`; `clock` is the monotonic time scrapes
    are stamped with (tests pass their own)."""

    def __init__(
        self,
        sources: Sequence[Source],
        config: PollerConfig = DEFAULT_CONFIG,
        *,
        clock: Callable[[], float] = time.monotonic,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.session = session  # closed with the poller, if given
        self.workers = [_Worker(s) for s in sources]
        self.started_wall_s = time.time()

    async def poll_once(self) -> None:
        """Scrape every worker once, together."""
        await asyncio.gather(*(self._poll(w) for w in self.workers))

    async def run(self) -> None:
        """Poll until cancelled, on absolute deadlines (a slow round does not drift them)."""
        next_s = self.clock()
        while True:
            await self.poll_once()
            next_s += self.config.interval_s
            await asyncio.sleep(max(0.0, next_s - self.clock()))

    async def close(self) -> None:
        for w in self.workers:
            await w.source.close()
        if self.session is not None:
            await self.session.close()

    async def _poll(self, worker: _Worker) -> None:
        try:
            text = await worker.source.read()
            new = parse(text, self.clock())
        except Exception as e:  # whatever one worker does, the others' columns go on
            worker.error = _reason(e)
            return
        self.add(worker, new)
        # Unanswered, the hardware stays unnamed until a later poll's answer.
        with contextlib.suppress(TimeoutError, OSError, aiohttp.ClientError, ValueError):
            await worker.source.describe()

    def add(self, worker: _Worker, new: Scrape) -> None:
        """Take one scrape of `worker`: the window moves on, a figure joins the history."""
        worker.error = None
        worker.polls += 1
        if worker.scrapes and is_reset(new, worker.scrapes[-1]):
            worker.scrapes.clear()  # the worker restarted: its counters start again
        # The oldest scrape still within the window is the base of every rate.
        while worker.scrapes and new.at_s - worker.scrapes[0].at_s > self.config.window_s:
            worker.scrapes.popleft()
        old = worker.scrapes[0] if worker.scrapes else None
        worker.scrapes.append(new)
        worker.latest = figures(new, old, worker.source.target.devices)
        worker.history.append((new.at_s, worker.latest))
        while len(worker.history) > self.config.history:
            worker.history.popleft()

    def snapshot(self) -> dict[str, Any]:
        """The page's JSON: per worker what it is, its figures now and their history
        (seconds before the newest scrape, oldest first)."""
        now = self.clock()
        return {
            "interval_s": self.config.interval_s,
            "window_s": self.config.window_s,
            "workers": [_worker_json(w, now) for w in self.workers],
        }


def _worker_json(w: _Worker, now: float) -> dict[str, Any]:
    t = w.source.target
    series: dict[str, list[float | None]] = {k: [] for k in HISTORY_KEYS}
    ages: list[float] = []
    for at_s, fig in w.history:
        ages.append(round(now - at_s, 3))
        values = fig.as_dict()
        for key in HISTORY_KEYS:
            series[key].append(values[key])
    return {
        "name": t.name,
        "hardware": t.hardware,
        "model": t.model,
        "devices": t.devices,
        "metrics_url": t.metrics_url,
        "up": w.error is None and w.polls > 0,
        "error": w.error,
        "polls": w.polls,
        "figures": w.latest.as_dict() if w.latest is not None else None,
        "history": {"age_s": ages, **series},
    }


def _reason(e: BaseException) -> str:
    """One line on why a scrape failed."""
    if isinstance(e, TimeoutError):
        return "no answer in time"
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
