"""Multi-turn sessions: a generator of chat workloads, and the chains a runner releases.

A session is a chain of turns; turn t is sent `delay_s` (think time) after turn t-1 ends
and resends the conversation so far (`RequestSpec.history`; the prompt ids come from
`prompts.turn_parts`). Closed loop: each user runs whole sessions, one after another.
Open loop: a session's first turn leaves at its offset, the later ones as they follow.

`MultiTurnWorkload`: `sessions = ceil(n / turns)` sessions of `turns` turns (the last
one cut short when `turns` does not divide `n`), in session order. Draw order (part of
the determinism contract): all `n` message lengths, then all `n` answer lengths, as
`SyntheticWorkload` draws them.

CLI: `memorywall bench --workload multi-turn:TURNS:THINK_MS --input-len MESSAGE
--output-len ANSWER ...`; `--num-prompts` counts turns.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from memorywall.loadgen import arrivals
from memorywall.loadgen.records import RequestRecord, RequestSpec
from memorywall.loadgen.workload import Length, check_count, is_int

__all__ = [
    "SCHEME",
    "MultiTurnWorkload",
    "chains",
    "follow_ups",
    "has_sessions",
    "parse_multi_turn",
    "prefix_hit_rate",
    "reports_prefix_hits",
    "with_session_offsets",
]

SCHEME = "multi-turn"


@dataclass(frozen=True, slots=True)
class MultiTurnWorkload:
    """Sessions of `turns` turns: user messages of `input` tokens, answers of `output`,
    `think_s` between a turn's end and the next turn."""

    turns: int
    think_s: float
    input: Length
    output: Length
    reports_prefix_hits = True

    def __post_init__(self) -> None:
        if not is_int(self.turns) or self.turns < 1:
            raise ValueError(f"multi-turn: turns must be an integer >= 1, got {self.turns!r}")
        if not math.isfinite(self.think_s) or self.think_s < 0:
            raise ValueError(f"multi-turn: think time must be >= 0 ms, got {self.think_s!r} s")

    def specs(self, rng: np.random.Generator, n: int) -> list[RequestSpec]:
        n = check_count(n)
        messages = self.input.sample(rng, n).tolist()
        answers = self.output.sample(rng, n).tolist()
        specs = []
        for i in range(n):
            session, turn = divmod(i, self.turns)
            history = tuple(zip(messages[i - turn : i], answers[i - turn : i], strict=True))
            specs.append(
                RequestSpec(
                    index=i,
                    prompt_tokens=messages[i] + sum(m + a for m, a in history),
                    output_tokens=answers[i],
                    session=session,
                    turn=turn,
                    delay_s=self.think_s if turn else 0.0,
                    history=history,
                )
            )
        return specs

    def __str__(self) -> str:
        return f"{SCHEME}:{self.turns}:{self.think_s * 1e3:g}"


def parse_multi_turn(text: str, input: Length, output: Length) -> MultiTurnWorkload:
    """Parse 'multi-turn:TURNS:THINK_MS'; a one-line ValueError otherwise."""
    parts = text.strip().split(":")
    if len(parts) != 3 or parts[0].lower() != SCHEME:
        raise ValueError(f"bad workload {text!r}: expected '{SCHEME}:<turns>:<think_ms>'")
    try:
        turns, think_ms = int(parts[1]), float(parts[2])
    except ValueError:
        raise ValueError(
            f"bad workload {text!r}: turns must be an integer and think_ms a number"
        ) from None
    try:
        return MultiTurnWorkload(turns, think_ms * 1e-3, input, output)
    except ValueError as e:
        raise ValueError(f"bad workload {text!r}: {e}") from None


def reports_prefix_hits(workload: object) -> bool:
    """Whether a workload's results carry `prefix_hit_rate` (those that share tokens
    by hash ids or sessions; other workloads' result files stay as they were)."""
    return bool(getattr(workload, "reports_prefix_hits", False))


def prefix_hit_rate(records: Sequence[RequestRecord]) -> float | None:
    """Cached prompt tokens over prompt tokens, over the measured requests that completed
    and said how many were cached (None: none did)."""
    cached = prompt = 0
    for r in records:
        if r.warmup or not r.ok or r.usage_cached_tokens is None:
            continue
        cached += r.usage_cached_tokens
        prompt += r.usage_prompt_tokens or r.prompt_tokens
    return cached / prompt if prompt else None


def has_sessions(specs: Sequence[RequestSpec]) -> bool:
    return any(s.session is not None for s in specs)


def chains(specs: Sequence[RequestSpec]) -> list[list[RequestSpec]]:
    """Specs grouped into sessions, in order of first turns; a spec of no session is a
    chain of its own."""
    out: list[list[RequestSpec]] = []
    by_session: dict[int, list[RequestSpec]] = {}
    for spec in specs:
        if spec.session is None:
            out.append([spec])
        elif (chain := by_session.get(spec.session)) is not None:
            chain.append(spec)
        else:
            by_session[spec.session] = chain = [spec]
            out.append(chain)
    return out


def follow_ups(specs: Sequence[RequestSpec]) -> dict[int, RequestSpec]:
    """Each turn's next turn in its session, by the turn's index."""
    return {a.index: b for chain in chains(specs) for a, b in itertools.pairwise(chain)}


def with_session_offsets(
    specs: Sequence[RequestSpec], rate_per_s: float, burstiness: float, rng: np.random.Generator
) -> list[RequestSpec]:
    """Open loop for sessions: sessions start at `rate_per_s` (gamma arrivals); a later
    turn has no offset of its own."""
    starts = [c[0] for c in chains(specs)]
    offsets = arrivals.gamma(rate_per_s, burstiness, len(starts), rng)
    at = {s.index: float(o) for s, o in zip(starts, offsets, strict=True)}
    return [replace(s, offset_s=at.get(s.index)) for s in specs]
