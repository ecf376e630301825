"""The bench runner's release rules for multi-turn sessions, driven by finish times.

As `loadgen/runner.py` releases them: a turn goes `delay_s` after the previous turn of
its session ends. Closed loop: each of `slots` users runs whole sessions, one after
another. Open loop: a session's first turn is due at its offset, a later turn when it
follows; each turn takes one of `slots` (None: no cap) and due turns go first-come
first-served. A turn is handed to the engine with its due time, which may be later than
the moment it is released (the engine holds it until then), as `_Releaser` does.
"""

from __future__ import annotations

import abc
import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable

from memorywall.loadgen import sessions
from memorywall.loadgen.records import RequestSpec

__all__ = ["Releaser", "SessionReleaser"]


class Releaser(abc.ABC):
    """What both release rules keep: free slots (`slots`, None: no cap), the stop time and
    the engine's `send(spec, at_s, scheduled_s)`. A subclass takes its plan in `_load`,
    sends with `release(now_s)` and is told of each end with `finished(now_s, spec)`."""

    def __init__(
        self,
        specs: Iterable[RequestSpec],
        *,
        open_loop: bool,
        slots: int | None,
        start_s: float,
        stop_s: float | None,
        send: Callable[[RequestSpec, float, float | None], None],
    ) -> None:
        self._open_loop = open_loop
        self._free = math.inf if slots is None else slots
        self._start_s = start_s
        self._stop_s = stop_s
        self._send = send
        self._load(specs)

    @abc.abstractmethod
    def _load(self, specs: Iterable[RequestSpec]) -> None:
        """Take the plan's requests, before the first `release`."""

    def _past_stop(self, due_s: float) -> bool:
        return self._stop_s is not None and due_s >= self._stop_s


class SessionReleaser(Releaser):
    """Sessions of one plan; `finished(now_s, spec)` for each turn that ends."""

    def _load(self, specs: Iterable[RequestSpec]) -> None:
        specs = list(specs)
        chains = sessions.chains(specs)
        self._next = sessions.follow_ups(specs)
        self._seq = 0
        # Open loop: turns by due time; closed loop: sessions not yet begun.
        self._due: list[tuple[float, int, RequestSpec]] = []
        self._sessions = deque(chains)
        if self._open_loop:
            self._sessions.clear()
            for chain in chains:
                self._push(self._start_s + chain[0].due_s, chain[0])

    def _push(self, due_s: float, spec: RequestSpec) -> None:
        heapq.heappush(self._due, (due_s, self._seq, spec))
        self._seq += 1

    def release(self, now_s: float) -> None:
        """Open loop: each free slot takes the turn due first. Closed loop: each free user
        begins the next session now."""
        if self._open_loop:
            while self._free > 0 and self._due:
                due, _, spec = heapq.heappop(self._due)
                if self._past_stop(due):
                    continue
                self._free -= 1
                self._send(spec, max(due, now_s), due)
            return
        while self._free > 0 and self._sessions:
            if self._past_stop(now_s):
                self._sessions.clear()
                return
            self._free -= 1
            self._send(self._sessions.popleft()[0], now_s, None)

    def finished(self, now_s: float, spec: RequestSpec) -> None:
        follow = self._next.get(spec.index)
        if self._open_loop:
            self._free += 1
            if follow is not None:
                self._push(now_s + follow.delay_s, follow)
        elif follow is not None:
            if not self._past_stop(now_s + follow.delay_s):
                self._send(follow, now_s + follow.delay_s, None)  # the user's next turn
            return  # else this user is done, as the runner's user returns
        else:
            self._free += 1
        self.release(now_s)
