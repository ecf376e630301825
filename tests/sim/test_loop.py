"""The engine's loop rule (`loop.next_move`) on its own: what comes after a step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from memorywall.server.engine.loop import Move, next_move


@dataclass
class FakeCore:
    """What the rule reads of `EngineCore`: its queues and when the oldest waiting arrived."""

    waiting_since_s: list[float] = field(default_factory=list)  # arrival of each waiting one
    running: list[object] = field(default_factory=list)

    @property
    def waiting(self) -> list[float]:
        return self.waiting_since_s

    def next_arrival_s(self) -> float:
        if self.running or not self.waiting_since_s:
            return 0.0
        return min(self.waiting_since_s)


@pytest.mark.parametrize(
    ("core", "last_end_s", "queued_s", "move"),
    [
        # Idle with nothing held: nothing happens until a submit.
        (FakeCore(), 3.0, math.inf, Move(math.inf, step=False, admit=False)),
        # Idle: jump to the next arrival, or admit at once what came in during the last step.
        (FakeCore(), 3.0, 5.0, Move(5.0, step=False, admit=True)),
        (FakeCore(), 3.0, 2.0, Move(3.0, step=False, admit=True)),
        # Running: the next step starts where the last ended, with what arrived by then.
        (FakeCore(running=[1]), 3.0, math.inf, Move(3.0, step=True, admit=False)),
        (FakeCore(running=[1]), 3.0, 3.0, Move(3.0, step=True, admit=True)),
        (FakeCore(running=[1]), 3.0, 3.5, Move(3.0, step=True, admit=False)),
        # Waiting since after the last step's end: the engine idled until that arrival.
        (FakeCore(waiting_since_s=[7.0, 6.0]), 3.0, 6.5, Move(6.0, step=True, admit=False)),
        (FakeCore(waiting_since_s=[7.0, 6.0]), 3.0, 6.0, Move(6.0, step=True, admit=True)),
        (FakeCore(waiting_since_s=[1.0]), 3.0, math.inf, Move(3.0, step=True, admit=False)),
    ],
)
def test_next_move(core, last_end_s, queued_s, move):
    assert next_move(core, last_end_s, queued_s) == move
