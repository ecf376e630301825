"""Raw per-request records: what the load generator saw, before any metric is computed,
and the per-request files they are written to and read back from.

All times are integer nanoseconds of `time.perf_counter_ns()` (CLOCK_MONOTONIC on
Linux, so records from worker processes on one machine share the clock).

A level's per-request file `STEM.requests.jsonl` has one JSON row per record
(`RequestRecord.as_dict`). Where each message's receipt time goes is the writer's
choice (`TOKEN_TIMES`): `jsonl` inline in each row (`chunk_ns`, `chunk_tokens`), as
`bench` writes; `npz` in a columnar file beside it, `STEM.tokens.npz` (`MessageTimes`:
four flat arrays, no per-token Python objects to build or encode), the rows without
those two fields, as `simulate` writes by default; `none` not at all. `read_requests`
reads all three back.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from itertools import chain
from operator import attrgetter
from pathlib import Path
from typing import Literal

import numpy as np

from memorywall.loadgen import jsonl

TokenTimes = Literal["npz", "jsonl", "none"]
TOKEN_TIMES: tuple[TokenTimes, ...] = ("npz", "jsonl", "none")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip member can have
# Tokens per message fit 32 bits (and are mostly 1): half the bytes of int64.
_NPZ_DTYPES = {"index": np.int64, "ends": np.int64, "ns": np.int64, "tokens": np.int32}
REQUESTS_SUFFIX = ".requests.jsonl"
TOKENS_SUFFIX = ".tokens.npz"


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

    def as_dict(self, *, messages: bool = True) -> dict:
        """Plain Python values (message times a list of ints), ready for JSON, in field
        order; without `messages`, no `chunk_ns` and `chunk_tokens` (`MessageTimes` holds
        them). Shallow: `dataclasses.asdict` deep-copied every int of the token lists, and
        cost ten times what encoding the rows did."""
        if not messages:
            return {name: getattr(self, name) for name in _ROW_FIELDS}
        d = {name: getattr(self, name) for name in _FIELDS}
        chunk_ns = self.chunk_ns
        d["chunk_ns"] = chunk_ns.tolist() if isinstance(chunk_ns, np.ndarray) else list(chunk_ns)
        d["chunk_tokens"] = list(self.chunk_tokens)
        return d


_FIELDS = tuple(f.name for f in fields(RequestRecord))
_MESSAGE_FIELDS = ("chunk_ns", "chunk_tokens")
_ROW_FIELDS = tuple(name for name in _FIELDS if name not in _MESSAGE_FIELDS)


@dataclass(frozen=True, slots=True)
class MessageTimes:
    """Every record's token-carrying messages, one record's after another's: the columnar
    per-token file `STEM.tokens.npz` (one array per field, no pickled objects; int64 but
    `tokens`, int32).

    `index`: each record's index (the JSONL's row order); `ends`: per record, one past
    its last message in `ns` and `tokens`; `ns`: each message's receipt time; `tokens`:
    the tokens it carried. Record i's messages are `ns[ends[i-1]:ends[i]]` (from 0 for
    the first)."""

    index: np.ndarray
    ends: np.ndarray
    ns: np.ndarray
    tokens: np.ndarray

    @classmethod
    def of(cls, records: Sequence[RequestRecord]) -> MessageTimes:
        """From records, whether their message times are lists (a client's) or slices of
        one array (the simulator's)."""
        n = len(records)
        counts = np.fromiter((len(r.chunk_ns) for r in records), np.int64, n)
        ends = np.cumsum(counts)
        total = int(ends[-1]) if n else 0
        chunks = [r.chunk_ns for r in records if len(r.chunk_ns)]
        ns = np.concatenate(chunks, dtype=np.int64) if chunks else np.empty(0, np.int64)
        tokens = np.fromiter(chain.from_iterable(r.chunk_tokens for r in records), np.int64)
        if tokens.size != total:
            raise ValueError("a record's chunk_tokens does not match its chunk_ns")
        index = np.fromiter((r.index for r in records), np.int64, n)
        return cls(index=index, ends=ends, ns=ns, tokens=tokens)

    def save(self, path: Path) -> None:
        """An uncompressed .npz, as `np.savez` writes it, but with a fixed date on every
        member (np.savez stamps the hour it ran): same records, same bytes."""
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for name, dtype in _NPZ_DTYPES.items():
                member = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
                with z.open(member, "w", force_zip64=True) as f:
                    array = np.ascontiguousarray(getattr(self, name), dtype=dtype)
                    np.lib.format.write_array(f, array, allow_pickle=False)

    @classmethod
    def load(cls, path: Path) -> MessageTimes:
        with np.load(path, allow_pickle=False) as z:
            return cls(index=z["index"], ends=z["ends"], ns=z["ns"], tokens=z["tokens"])

    def give(self, records: Sequence[RequestRecord]) -> None:
        """Set each of `records` (in this file's order) its message times, as lists;
        raises ValueError when they are not the records this file was written for."""
        if len(records) != self.index.size or any(
            r.index != i for r, i in zip(records, self.index.tolist(), strict=True)
        ):
            raise ValueError("message times were written for other requests")
        ns, tokens = self.ns.tolist(), self.tokens.tolist()
        start = 0
        for record, end in zip(records, self.ends.tolist(), strict=True):
            record.chunk_ns, record.chunk_tokens = ns[start:end], tokens[start:end]
            start = end


def write_requests(
    out_dir: Path,
    stem: str,
    records: Sequence[RequestRecord],
    *,
    token_times: TokenTimes = "jsonl",
    messages: MessageTimes | None = None,
) -> None:
    """A level's per-request file and, with `token_times="npz"`, its message times beside
    it (`messages` when the caller has them in arrays already, else taken from `records`)."""
    if token_times not in TOKEN_TIMES:
        raise ValueError(f"token times: want one of {', '.join(TOKEN_TIMES)}, got {token_times!r}")
    jsonl.write_objects(
        out_dir / f"{stem}{REQUESTS_SUFFIX}", _rows(records, inline=token_times == "jsonl"), "index"
    )
    tokens = out_dir / f"{stem}{TOKENS_SUFFIX}"
    if token_times == "npz":
        (messages or MessageTimes.of(records)).save(tokens)
    else:  # an earlier run's would be read back as this one's
        tokens.unlink(missing_ok=True)


def _rows(records: Sequence[RequestRecord], *, inline: bool) -> list[dict]:
    """`RequestRecord.as_dict` of each record, for the encoder alone: each record's fields
    read in one C call, and message times left as they are (a list, or the simulator's
    int64 slice, which orjson encodes as the same list of ints without a Python int
    each)."""
    names = _FIELDS if inline else _ROW_FIELDS
    values = attrgetter(*names)
    return [dict(zip(names, values(r), strict=True)) for r in records]


def read_requests(path: Path) -> list[RequestRecord]:
    """The records of a per-request file `STEM.requests.jsonl`, their message times from
    its rows or from `STEM.tokens.npz` beside it (none if neither has them)."""
    rows = list(jsonl.read_rows(path))
    records = [RequestRecord(**row) for row in rows]
    name = path.name
    inline = any("chunk_ns" in row for row in rows)
    if not inline and name.endswith(REQUESTS_SUFFIX):
        tokens = path.with_name(name[: -len(REQUESTS_SUFFIX)] + TOKENS_SUFFIX)
        if tokens.exists():
            MessageTimes.load(tokens).give(records)
    return records
