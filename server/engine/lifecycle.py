"""Weights loaded or not, asleep or awake: the engine's lifecycle, timed by the core.

vLLM's lifecycle as its dev endpoints drive it: the server loads its weights at
startup (here: `Deployment.weight_load_s`, the weights' bytes over each device's
host link; `--load-format dummy` loads none and is ready at once), `/sleep` level
1 frees the KV cache (and vLLM offloads the weights to host memory), level 2 also
drops the weights, and `/wake_up` takes the load time again, whichever the level.
Sleep itself is instant. Requests are refused (503) until the first load ends and
while asleep or waking; the prefix cache is emptied by a sleep, as the KV it
indexed is gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

from memorywall.errors import InvalidRequestError, LifecycleError, NotReadyError

SLEEP_LEVELS = (1, 2)


class Phase(Enum):
    LOADING = "loading"  # the first load, at startup
    READY = "ready"
    SLEEPING = "sleeping"
    WAKING = "waking"


@dataclass(frozen=True, slots=True)
class LifecycleState:
    """What `/is_sleeping` and the health checks read."""

    phase: Phase
    sleep_level: int = 0  # 0 while awake

    @property
    def loaded(self) -> bool:
        """The startup load has ended (health checks pass from then on)."""
        return self.phase is not Phase.LOADING

    @property
    def sleeping(self) -> bool:
        """Asleep, or waking (vLLM's `is_sleeping` stays true until wake-up returns)."""
        return self.phase in (Phase.SLEEPING, Phase.WAKING)


def check_serving(state: LifecycleState) -> None:
    """NotReadyError unless an engine in `state` admits requests."""
    phase = state.phase
    if phase is Phase.LOADING:
        raise NotReadyError("loading the weights; retry once /health answers 200")
    if phase is not Phase.READY:
        raise NotReadyError(f"the engine is {phase.value} (POST /wake_up to serve again)")


class Lifecycle:
    """The state machine. `wait(seconds)` waits on the engine's clock (a fake in tests);
    `free_kv()` drops the prefix cache and says whether it could (no request holds KV)."""

    def __init__(
        self,
        load_s: float,
        wait: Callable[[float], Awaitable[None]],
        free_kv: Callable[[], bool],
    ) -> None:
        if load_s < 0:
            raise ValueError(f"load_s: must be >= 0, got {load_s}")
        self.load_s = load_s
        self._wait = wait
        self._free_kv = free_kv
        self.state = LifecycleState(Phase.LOADING if load_s > 0 else Phase.READY)
        self._changing = asyncio.Lock()

    def check_serving(self) -> None:
        """NotReadyError unless requests may be admitted now."""
        check_serving(self.state)

    async def load(self) -> None:
        """The startup load: ready `load_s` after it starts."""
        async with self._changing:
            if self.state.phase is Phase.LOADING:
                await self._wait(self.load_s)
                self.state = LifecycleState(Phase.READY)

    async def sleep(self, level: int, busy: bool) -> None:
        """Free the KV (level 1) and the weights (level 2); refused while requests run."""
        if level not in SLEEP_LEVELS:
            raise InvalidRequestError(f"level: must be 1 or 2, got {level!r}")
        async with self._changing:
            phase = self.state.phase
            if phase is Phase.LOADING:
                raise NotReadyError("still loading the weights; nothing to put to sleep")
            if phase is Phase.SLEEPING:
                # A deeper sleep drops the weights too; a lighter one changes nothing.
                self.state = LifecycleState(phase, max(level, self.state.sleep_level))
                return
            if busy:
                raise LifecycleError("sleep: requests are in flight; drain them first")
            if not self._free_kv():
                raise LifecycleError("sleep: KV blocks are still held (a prefill hand-off)")
            self.state = LifecycleState(Phase.SLEEPING, level)

    async def wake_up(self) -> None:
        """Load the weights back (`load_s`, whichever the level), then serve; a no-op awake."""
        async with self._changing:
            if self.state.phase is not Phase.SLEEPING:
                return
            asleep = self.state
            self.state = LifecycleState(Phase.WAKING, asleep.sleep_level)
            try:
                await self._wait(self.load_s)
            except BaseException:  # cancelled: still asleep
                self.state = asleep
                raise
            self.state = LifecycleState(Phase.READY)
