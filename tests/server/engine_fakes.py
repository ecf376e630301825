"""Stand-ins the engine tests share: a step-cost model with round numbers, and a clock
that jumps to each deadline."""

import asyncio
from dataclasses import dataclass, field

from memorywall.core import Batch


@dataclass(frozen=True)
class FakeCost:
    time_s: float
    energy_j: float


@dataclass
class FakeStepModel:
    """time = 10 ms + 0.1 ms per query token; energy = 1 J per token; remembers every batch."""

    batches: list[Batch] = field(default_factory=list)

    def step_cost(self, batch: Batch) -> FakeCost:
        self.batches.append(batch)
        tokens = len(batch.decode_contexts) + sum(c.new_tokens for c in batch.prefill)
        return FakeCost(time_s=0.01 + 1e-4 * tokens, energy_j=float(tokens))


class FakeClock:
    """Jumps to each deadline at once: the engine runs as fast as the CPU allows."""

    def __init__(self) -> None:
        self.t = 1000.0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline_s: float) -> None:
        self.t = max(self.t, deadline_s)
        await asyncio.sleep(0)

    def close(self) -> None:
        pass
