"""The records' fields as numpy arrays, so that `metrics` computes each metric over every
record at once: one pass over the records per field is cheap, where a pass per record
through every metric cost more than all of their statistics together.

A client's records hold lists of message times; the simulator's hold slices of one int64
array (`memorywall.sim.simulate.make_records`). Both read the same way here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, compress
from operator import attrgetter

import numpy as np

from memorywall.loadgen.records import RequestRecord

__all__ = ["Messages", "OptionalColumn", "SentRecords"]


@dataclass(frozen=True, slots=True)
class OptionalColumn:
    """One optional field of each record: its value (0 where None) and whether it has one."""

    value: np.ndarray
    given: np.ndarray

    @classmethod
    def of(cls, values: list[float | None], dtype: type) -> OptionalColumn:
        n = len(values)
        if None not in values:  # every record has one (the simulator's always do)
            return cls(np.array(values, dtype=dtype), np.ones(n, dtype=bool))
        return cls(
            np.fromiter((0 if v is None else v for v in values), dtype, n),
            np.fromiter((v is not None for v in values), bool, n),
        )

    def __getitem__(self, rows: np.ndarray) -> OptionalColumn:
        return OptionalColumn(self.value[rows], self.given[rows])

    def present(self) -> np.ndarray:
        return self.value[self.given]


@dataclass(frozen=True, slots=True, kw_only=True)
class SentRecords:
    """The non-warm-up records, one entry per record in each column, in record order."""

    warmup: int  # warm-up records left out
    index: np.ndarray
    error: list[str | None]
    chunk_ns: list[Sequence[int]]
    chunk_tokens: list[list[int]]
    messages: np.ndarray  # how many token-carrying messages
    sent_ns: np.ndarray
    scheduled_ns: OptionalColumn
    finished_ns: OptionalColumn
    prompt_tokens: np.ndarray  # the server's usage when it gave one, else as requested
    usage_completion_tokens: OptionalColumn
    modelled_ttft_s: OptionalColumn
    modelled_e2e_s: OptionalColumn
    modelled_decode_s: OptionalColumn
    ok: np.ndarray  # `RequestRecord.ok`: no error and a token-carrying message

    @classmethod
    def of(cls, records: Iterable[RequestRecord]) -> SentRecords:
        records = list(records)
        sent = [r for r in records if not r.warmup]
        n = len(sent)

        def column(name: str) -> list:
            return list(map(attrgetter(name), sent))

        def ints(name: str) -> np.ndarray:
            return np.array(column(name), dtype=np.int64)

        def optional(name: str, dtype: type = np.int64) -> OptionalColumn:
            return OptionalColumn.of(column(name), dtype)

        chunk_ns, error = column("chunk_ns"), column("error")
        messages = np.fromiter(map(len, chunk_ns), np.int64, n)
        usage_prompt = optional("usage_prompt_tokens")
        return cls(
            warmup=len(records) - n,
            index=ints("index"),
            error=error,
            chunk_ns=chunk_ns,
            chunk_tokens=column("chunk_tokens"),
            messages=messages,
            sent_ns=ints("sent_ns"),
            scheduled_ns=optional("scheduled_ns"),
            finished_ns=optional("finished_ns"),
            prompt_tokens=np.where(usage_prompt.given, usage_prompt.value, ints("prompt_tokens")),
            usage_completion_tokens=optional("usage_completion_tokens"),
            modelled_ttft_s=optional("modelled_ttft_s", np.float64),
            modelled_e2e_s=optional("modelled_e2e_s", np.float64),
            modelled_decode_s=optional("modelled_decode_s", np.float64),
            ok=(messages > 0) & np.fromiter((e is None for e in error), bool, n),
        )

    def completion_tokens(self) -> np.ndarray:
        """`RequestRecord.completion_tokens` of each successful record."""
        usage = self.usage_completion_tokens[self.ok]
        tokens = usage.value.copy()
        counted = np.flatnonzero(self.ok)[~usage.given]
        tokens[~usage.given] = [sum(self.chunk_tokens[i]) for i in counted]
        return tokens

    def last_receipt_ns(self) -> int | None:
        """The last token-carrying message or finish of any record; None: none."""
        last = [c[-1] for c, n in zip(self.chunk_ns, self.messages.tolist(), strict=True) if n]
        receipts = [*last, *self.finished_ns.present().tolist()]
        return int(max(receipts)) if receipts else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Messages:
    """The successful records' token-carrying messages, one record's after another's."""

    ns: np.ndarray  # receipt times
    # Tokens in each, 1 each where a record's counts do not match its messages (vLLM's
    # view); None: every message carries one token, as most servers send them.
    tokens: np.ndarray | None
    starts: np.ndarray  # per record: its first message
    ends: np.ndarray  # per record: one past its last message

    @classmethod
    def of(cls, sent: SentRecords) -> Messages:
        ok = sent.ok.tolist()
        chunks = list(compress(sent.chunk_ns, ok))
        lengths = sent.messages[sent.ok]
        ends = np.cumsum(lengths)
        counts = [
            t if len(t) == n else [1] * n
            for t, n in zip(compress(sent.chunk_tokens, ok), lengths.tolist(), strict=True)
        ]
        tokens = None
        if not all(t.count(1) == len(t) for t in counts):
            tokens = np.fromiter(chain.from_iterable(counts), np.int64, int(lengths.sum()))
        return cls(
            # The simulator's slices copied once; a client's lists converted.
            ns=np.concatenate(chunks, dtype=np.int64) if chunks else np.empty(0, np.int64),
            tokens=tokens,
            starts=ends - lengths,
            ends=ends,
        )

    @property
    def first_ns(self) -> np.ndarray:
        return self.ns[self.starts]

    @property
    def last_ns(self) -> np.ndarray:
        return self.ns[self.ends - 1]

    def gaps_ns(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The gap before each message after a record's first, and the tokens that message
        carries (None: one each); raises if a record's message times go backwards
        (`index`: each record's index, to name it)."""
        gaps = np.diff(self.ns)
        keep = np.ones(gaps.size, dtype=bool)
        keep[self.ends[:-1] - 1] = False  # from one record's last message to the next's first
        gaps = gaps[keep]
        if (gaps < 0).any():
            at = np.flatnonzero(keep)[np.argmax(gaps < 0)]
            bad = index[np.searchsorted(self.ends, at, side="right")]
            raise ValueError(f"record {bad}: message times go backwards")
        return gaps, None if self.tokens is None else self.tokens[1:][keep]
