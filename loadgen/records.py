"""Raw per-request records: what the load generator saw, before any metric is computed.

All times are integer nanoseconds of `time.perf_counter_ns()` (CLOCK_MONOTONIC on
Linux, so records from worker processes on one machine share the clock).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request to send: its sizes and, in open loop, when to send it."""

    index: int
    prompt_tokens: int
    output_tokens: int
    # Open loop: seconds after the run's start. Closed loop: None (sent when a user is free).
    offset_s: float | None = None
    # Shared-prefix workloads: requests of one group begin with the same `prefix_tokens`
    # tokens (the OpenAI targets build that prefix from the group alone); None: no group.
    prefix_group: int | None = None
    prefix_tokens: int = 0
    # Mooncake traces: the prompt is these blocks of `block_tokens` tokens each, cut to
    # `prompt_tokens` (equal ids are equal tokens; `prompts.hash_block_ids`); (): none.
    hash_ids: tuple[int, ...] = ()
    block_tokens: int = 0
    # Multi-turn sessions (None: a request of its own): the turn is sent `delay_s` after
    # the previous turn of `session` ends, its prompt the (message, answer) lengths of
    # the earlier turns (`history`, whose tokens it resends) and then its own message.
    session: int | None = None
    turn: int = 0
    delay_s: float = 0.0
    history: tuple[tuple[int, int], ...] = ()
    # The model it asks for by name (a trace row's `model`: a LoRA adapter the server
    # serves); None: the target's model.
    model: str | None = None

    @property
    def due_s(self) -> float:
        """Open loop: `offset_s`, which every open-loop request has (ValueError if not)."""
        if self.offset_s is None:
            raise ValueError(f"open loop: request {self.index} has no offset_s (arrival time)")
        return self.offset_s


@dataclass(slots=True)
class RequestRecord:
    index: int
    prompt_tokens: int  # as requested
    output_tokens: int  # max_tokens as requested
    scheduled_ns: int | None  # open loop: when it should have been sent
    sent_ns: int
    # Receipt of each token-carrying message: a client appends to a list; the simulator
    # gives each record its slice of one int64 array.
    chunk_ns: list[int] | np.ndarray = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each of those messages
    finished_ns: int | None = None
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    usage_cached_tokens: int | None = None
    # The emulator's modelled timeline for this request (None against other servers).
    modelled_ttft_s: float | None = None
    modelled_e2e_s: float | None = None
    modelled_decode_s: float | None = None
    # When the emulator's engine received it, on its CLOCK_MONOTONIC: the clock of
    # `sent_ns` when client and server share a host (the simulator: its virtual clock, as
    # `sent_ns`); None: not said, or another server.
    server_received_ns: int | None = None
    error: str | None = None
    warmup: bool = False
    worker: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.chunk_ns) > 0

    def add_chunk(self, received_ns: int, tokens: int) -> None:
        """A client received one token-carrying message (the simulator sets arrays whole)."""
        chunk_ns = self.chunk_ns
        assert isinstance(chunk_ns, list), "only a client's record grows message by message"
        chunk_ns.append(received_ns)
        self.chunk_tokens.append(tokens)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated: the server's usage when it gave one, else tokens received."""
        if self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return sum(self.chunk_tokens)

    def as_dict(self) -> dict:
        """Plain Python values (message times a list of ints), ready for JSON, in field
        order. Shallow: `dataclasses.asdict` deep-copied every int of the token lists, and
        cost ten times what encoding the rows did."""
        d = {name: getattr(self, name) for name in _FIELDS}
        chunk_ns = self.chunk_ns
        d["chunk_ns"] = chunk_ns.tolist() if isinstance(chunk_ns, np.ndarray) else list(chunk_ns)
        d["chunk_tokens"] = list(self.chunk_tokens)
        return d


_FIELDS = tuple(f.name for f in fields(RequestRecord))
