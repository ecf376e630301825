"""Stand-ins the engine tests share: a step-cost model with round numbers, a clock that
jumps to each deadline, one that steps to them (and can wake late: a stalled host), and a
model card for fronts that need no real deployment."""

import asyncio
from dataclasses import dataclass, field

from memorywall.core import Batch
from memorywall.server.engine.build import ModelCard


def model_card(**changes: object) -> ModelCard:
    """A small card ("m" on one "hw" device); `changes` override its fields."""
    fields: dict = dict(
        model="m",
        context_window=4096,
        vocab_size=1000,
        eos_token_ids=(2,),
        hardware="hw",
        devices=1,
        tensor_parallel=1,
        pipeline_parallel=1,
        weight_precision="bf16",
        kv_precision="bf16",
        placement="resident",
        deployment="m on 1 x hw",
        kv_capacity_tokens=1 << 20,
        max_num_seqs=8,
        max_num_batched_tokens=512,
        predicted_tokens_per_s_per_user=100.0,
    )
    return ModelCard(**(fields | changes))


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


class SteppingClock:
    """A test clock: each sleep first lets ready readers run (at the time their tokens were
    handed out), then jumps to the deadline, plus `stalls[i]` seconds on the i-th sleep: a
    host that woke that late."""

    def __init__(self, stalls: dict[int, float] | None = None) -> None:
        self.t = 1000.0
        self.sleeps = 0
        self.stalls = stalls or {}

    def now(self) -> float:
        return self.t

    async def sleep_until(self, deadline_s: float) -> None:
        await asyncio.sleep(0)
        self.t = max(self.t, deadline_s) + self.stalls.get(self.sleeps, 0.0)
        self.sleeps += 1

    def close(self) -> None:
        pass
