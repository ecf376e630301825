"""How many messages the host may send: a budget refilled on the engine clock.

The live engine hands each token to its stream alone while the budget lasts;
past it, a stream's tokens wait for a message of the size the rate needs (the
live engine's `max_hold_s`, or one step, at most), so the message rate falls
before the host falls behind. The rate adapts: it
backs off when the server process is busy nearly all the time between engine
wake-ups (its fronts use up a core) or when the engine wakes over half its
stall tolerance late (the machine is short of CPU, clients included: fewer
messages cost less on both sides); with time to spare it creeps back to its
ceiling. Holding a token one step costs less than a stall, which moves the
whole timeline.
"""

from __future__ import annotations

BUSY = 0.9  # CPU seconds per wall second above which the process counts as saturated
BACKOFF = 0.8  # rate factor after a busy or late step
RECOVER = 1.01  # rate factor after a step with time to spare
FLOOR_PER_S = 100.0


class MessageBudget:
    """Up to `ceiling_per_s` messages a second, never saved up (or owed) beyond one refill
    interval."""

    __slots__ = ("_last_s", "available", "ceiling_per_s", "rate_per_s")

    def __init__(self, ceiling_per_s: float) -> None:
        if ceiling_per_s <= 0:
            raise ValueError(f"ceiling_per_s: must be > 0, got {ceiling_per_s}")
        self.ceiling_per_s = ceiling_per_s
        self.rate_per_s = ceiling_per_s
        self.available = 0.0
        self._last_s: float | None = None

    def adapt(self, *, busy: float, late_s: float, tolerance_s: float, steps: int = 1) -> None:
        """After `steps` steps: `busy` is the process's CPU time over the wall time they took,
        `late_s` how late the engine woke for the last, `tolerance_s` the lateness that would
        be a stall. Each step counts as one back-off (or recovery)."""
        if busy > BUSY or late_s > tolerance_s / 2:
            floor = min(FLOOR_PER_S, self.ceiling_per_s)
            self.rate_per_s = max(self.rate_per_s * BACKOFF**steps, floor)
        elif self.rate_per_s < self.ceiling_per_s:
            self.rate_per_s = min(self.rate_per_s * RECOVER**steps, self.ceiling_per_s)

    def refill(self, now_s: float) -> None:
        """Add what accrued since the last refill; at least one message's worth is allowed."""
        accrued = 1.0 if self._last_s is None else self.rate_per_s * (now_s - self._last_s)
        self._last_s = now_s
        cap = max(accrued, 1.0)
        self.available = max(min(self.available + accrued, cap), -cap)

    def take(self) -> bool:
        """Spend one message if the budget has it."""
        if self.available >= 1.0:
            self.available -= 1.0
            return True
        return False

    def spend(self) -> None:
        """Spend one message that must go out regardless (it may run the budget into debt)."""
        self.available -= 1.0
