"""What to send: prompt and output lengths per request, synthetic or replayed from a trace.

Every workload gives `specs(rng, n) -> list[RequestSpec]`. Synthetic lengths are drawn from
the injected, seeded `numpy.random.Generator` (never the global random state), so the same
seed gives the same specs. Arrival offsets come from `memorywall.loadgen.arrivals`, except for
traces that carry their own arrival times, which are replayed as they are.

Length distributions:

- `Fixed(tokens)`: every request has `tokens`.
- `Uniform(mean, range_ratio)`: vLLM `bench serve --dataset-name random` semantics
  (`vllm/benchmarks/datasets/random.py`, `RandomDataset.get_sampling_params`): integers drawn
  uniformly from the closed range [floor(mean * (1 - r)), ceil(mean * (1 + r))], r in [0, 1),
  with the low end raised to 1 (vLLM does this for output lengths; here for both, since the
  special-token adjustment vLLM makes to input lengths does not apply).
- `LogNormal(median, sigma)`: exp(N(ln median, sigma^2)) rounded to the nearest integer and
  clipped to >= 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeGuard, runtime_checkable

import numpy as np

from memorywall.loadgen import jsonl
from memorywall.loadgen.records import RequestSpec

__all__ = [
    "Fixed",
    "Length",
    "LogNormal",
    "SyntheticWorkload",
    "TraceRequest",
    "TraceWorkload",
    "Uniform",
    "Workload",
    "parse_length",
]


def is_int(value: object) -> TypeGuard[int | np.integer]:
    """An integer, Python's or numpy's, and not a bool (True as a count is a bug, not a 1)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[float | np.integer | np.floating]:
    """A real number, Python's or numpy's, and not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def check_count(n: object) -> int:
    """`n` as a number of requests; ValueError unless it is an integer >= 1."""
    if not is_int(n) or n < 1:
        raise ValueError(f"number of requests must be an integer >= 1, got {n!r}")
    return int(n)


@runtime_checkable
class Length(Protocol):
    """A distribution of token counts."""

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` token counts (int64, each >= 1)."""
        ...


@dataclass(frozen=True, slots=True)
class Fixed:
    """Every request has exactly `tokens` tokens. Draws nothing from the generator."""

    tokens: int

    def __post_init__(self) -> None:
        if not is_int(self.tokens) or self.tokens < 1:
            raise ValueError(f"Fixed: tokens must be an integer >= 1, got {self.tokens!r}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(check_count(n), self.tokens, dtype=np.int64)

    def __str__(self) -> str:
        return str(self.tokens)


@dataclass(frozen=True, slots=True)
class Uniform:
    """Integers uniform on [floor(mean*(1-r)), ceil(mean*(1+r))], low end raised to 1.

    vLLM's `RandomDataset` range_ratio: `rng.integers(low, high + 1, size=n)`.
    """

    mean: int
    range_ratio: float

    def __post_init__(self) -> None:
        if not is_int(self.mean) or self.mean < 1:
            raise ValueError(f"Uniform: mean must be an integer >= 1, got {self.mean!r}")
        if not is_number(self.range_ratio) or not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"Uniform: range_ratio must be in [0, 1), got {self.range_ratio!r}")

    @property
    def low(self) -> int:
        return max(1, math.floor(self.mean * (1.0 - self.range_ratio)))

    @property
    def high(self) -> int:
        return max(1, math.ceil(self.mean * (1.0 + self.range_ratio)))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.low, self.high + 1, size=check_count(n), dtype=np.int64)

    def __str__(self) -> str:
        return f"uniform:{self.mean}:{self.range_ratio}"


@dataclass(frozen=True, slots=True)
class LogNormal:
    """round(exp(N(ln median, sigma^2))), clipped to >= 1. sigma = 0 gives round(median)."""

    median: float
    sigma: float

    def __post_init__(self) -> None:
        if not is_number(self.median) or not math.isfinite(self.median) or self.median <= 0:
            raise ValueError(f"LogNormal: median must be a finite number > 0, got {self.median!r}")
        if not is_number(self.sigma) or not math.isfinite(self.sigma) or self.sigma < 0:
            raise ValueError(f"LogNormal: sigma must be a finite number >= 0, got {self.sigma!r}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        draws = rng.lognormal(mean=math.log(self.median), sigma=self.sigma, size=check_count(n))
        return np.maximum(np.rint(draws), 1).astype(np.int64)

    def __str__(self) -> str:
        return f"lognormal:{self.median}:{self.sigma}"


class Workload(Protocol):
    """Something that turns a generator and a count into request specs."""

    def specs(self, rng: np.random.Generator, n: int) -> list[RequestSpec]: ...


@dataclass(frozen=True, slots=True)
class SyntheticWorkload:
    """Prompt and output lengths drawn independently; no arrival offsets (closed loop).

    Draw order (part of the determinism contract): all `n` prompt lengths, then all `n`
    output lengths, as vLLM's `RandomDataset` does. Attach open-loop offsets with
    `arrivals.with_offsets`.
    """

    input: Length
    output: Length

    def specs(self, rng: np.random.Generator, n: int) -> list[RequestSpec]:
        n = check_count(n)
        prompts = self.input.sample(rng, n)
        outputs = self.output.sample(rng, n)
        # Python ints first (`tolist`): iterating the arrays made a numpy scalar of each.
        return [
            RequestSpec(index=i, prompt_tokens=p, output_tokens=o)
            for i, (p, o) in enumerate(zip(prompts.tolist(), outputs.tolist(), strict=True))
        ]


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One line of a trace file. In a session, `prompt_tokens` is the turn's own message
    (the earlier turns it resends are added by `TraceWorkload.specs`)."""

    prompt_tokens: int
    output_tokens: int
    arrival_s: float | None = None
    hash_ids: tuple[int, ...] = ()
    session: int | None = None  # sessions numbered by first appearance in the file
    delay_s: float = 0.0  # a later turn: after the session's previous turn ends
    model: str | None = None  # the row's `model` (a LoRA adapter's name); None: the target's


# Accepted spellings, canonical first. `input_length`/`output_length`/`timestamp` are the
# Mooncake trace format that AIPerf and Dynamo replay; `input_tokens` is Dynamo's alias.
_PROMPT_KEYS = ("prompt_tokens", "input_length", "input_tokens")
_OUTPUT_KEYS = ("output_tokens", "output_length")
# key -> factor to seconds. Mooncake's `timestamp` is in milliseconds.
_ARRIVAL_KEYS = {"arrival_s": 1.0, "timestamp": 1e-3}
MOONCAKE_BLOCK_TOKENS = 512  # the tokens per hash id of Kimi's published traces


@dataclass(frozen=True, slots=True)
class TraceWorkload:
    """Requests replayed from a file, in file order.

    Lengths come from the file and ignore the generator. When the file carries arrival
    times (every line or none), `specs` sets `offset_s` to them as they are: seconds after
    the run's start, not rebased to the first arrival (as vLLM replays timestamped traces).
    A session's later turns have no arrival: each follows its previous turn's end.
    """

    requests: tuple[TraceRequest, ...]
    block_tokens: int = MOONCAKE_BLOCK_TOKENS  # tokens per hash id

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError("TraceWorkload: no requests")

    @property
    def has_arrivals(self) -> bool:
        return self.requests[0].arrival_s is not None

    @property
    def reports_prefix_hits(self) -> bool:
        """Whether its prompts share tokens (hash ids, sessions): results then carry
        `prefix_hit_rate`."""
        return any(r.hash_ids or r.session is not None for r in self.requests)

    def __len__(self) -> int:
        return len(self.requests)

    def specs(self, rng: np.random.Generator, n: int) -> list[RequestSpec]:
        """The first `n` requests of the trace; more than the trace holds is an error."""
        n = check_count(n)
        if n > len(self.requests):
            raise ValueError(f"trace holds {len(self.requests)} requests, {n} asked for")
        if not self.reports_prefix_hits:  # as before hash ids and sessions were read
            return [
                RequestSpec(
                    index=i,
                    prompt_tokens=r.prompt_tokens,
                    output_tokens=r.output_tokens,
                    offset_s=r.arrival_s,
                    model=r.model,
                )
                for i, r in enumerate(self.requests[:n])
            ]
        history: dict[int, tuple[tuple[int, int], ...]] = {}
        specs = []
        for i, r in enumerate(self.requests[:n]):
            extra: dict[str, Any] = {}
            prompt = r.prompt_tokens
            if r.hash_ids:
                extra = {"hash_ids": r.hash_ids, "block_tokens": self.block_tokens}
            elif r.session is not None:
                before = history.get(r.session, ())
                history[r.session] = (*before, (r.prompt_tokens, r.output_tokens))
                prompt += sum(m + a for m, a in before)
                extra = {
                    "session": r.session,
                    "turn": len(before),
                    "delay_s": r.delay_s,
                    "history": before,
                }
            specs.append(
                RequestSpec(
                    index=i,
                    prompt_tokens=prompt,
                    output_tokens=r.output_tokens,
                    offset_s=r.arrival_s,
                    model=r.model,
                    **extra,
                )
            )
        return specs

    @classmethod
    def from_jsonl(
        cls, path: str | Path, *, block_tokens: int = MOONCAKE_BLOCK_TOKENS
    ) -> TraceWorkload:
        """Read one JSON object per line; blank lines are skipped, unknown keys ignored.

        Fields: `prompt_tokens` (or `input_length`, `input_tokens`), `output_tokens` (or
        `output_length`): integers >= 1. Optional arrival: `arrival_s` (seconds) or
        `timestamp` (milliseconds, Mooncake); finite, >= 0, non-decreasing, and on every
        line or none (but a session's later turns). Optional `hash_ids` (Mooncake): ids
        >= 0 of the prompt's `block_tokens`-token blocks, at most as many as its prompt
        holds. Optional `session_id` (string or integer) with `delay` (ms, later turns
        only): a multi-turn session, its rows in turn order; a turn's `input_length` is
        its new message. Optional `model`: the name the request asks for (a LoRA
        adapter's; default: the target's model). Any fault raises a one-line ValueError
        "path:line: field: problem". A bench run's per-request file is replayed by its
        arrivals (`from_records`).
        """
        path = Path(path)
        if not is_int(block_tokens) or block_tokens < 1:
            raise ValueError(f"block size must be an integer >= 1, got {block_tokens!r}")
        records = _bench_records(path)
        if records is not None:
            return cls.from_records(records, str(path))
        requests: list[TraceRequest] = []
        sessions: dict[str | int, int] = {}
        first_has_arrival: bool | None = None
        previous_arrival = 0.0
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON: {e.msg}") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                prompt = _count_field(obj, _PROMPT_KEYS, where)
                output = _count_field(obj, _OUTPUT_KEYS, where)
                arrival = _arrival_field(obj, where)
                hash_ids = _hash_ids_field(obj, prompt, block_tokens, where)
                session, delay_s = _session_fields(obj, sessions, where)
                model = _model_field(obj, where)
                if hash_ids and session is not None:
                    raise ValueError(f"{where}: hash_ids: not supported on a session's turns")
                if delay_s is not None:  # a later turn: timed by its session, not the file
                    if arrival is not None:
                        raise ValueError(
                            f"{where}: timestamp: a session's later turn is sent by its delay"
                        )
                    requests.append(TraceRequest(prompt, output, None, (), session, delay_s, model))
                    continue
                has_arrival = arrival is not None
                if first_has_arrival is None:
                    first_has_arrival = has_arrival
                elif has_arrival != first_has_arrival:
                    state = "has" if has_arrival else "lacks"
                    raise ValueError(
                        f"{where}: arrival_s: line {state} an arrival time but the first line "
                        "does not agree (arrivals go on every line or none)"
                    )
                if arrival is not None:
                    if arrival < previous_arrival:
                        raise ValueError(
                            f"{where}: arrival_s: {arrival:g} s is before the previous "
                            f"line's {previous_arrival:g} s"
                        )
                    previous_arrival = arrival
                requests.append(
                    TraceRequest(prompt, output, arrival, hash_ids, session, model=model)
                )
        if not requests:
            raise ValueError(f"{path}: no requests in file")
        return cls(tuple(requests), block_tokens)

    @classmethod
    def from_records(cls, records: list[dict[str, Any]], origin: str) -> TraceWorkload:
        """Replay a bench run (its per-request JSONL rows): each request that was not a
        warm-up arrives, with the lengths it asked for, when the emulator's engine received
        it (`server_received_ns`, when every such row has it: the arrivals the live engine
        saw, transport delay included) or else when it was sent, counted from the first;
        so a simulation sees the server's arrivals, whatever the client that made them."""
        main = [r for r in records if not r.get("warmup")]
        if not main:
            raise ValueError(f"{origin}: no requests but warm-ups")
        key = (
            "server_received_ns"
            if all(is_int(r.get("server_received_ns")) for r in main)
            else "sent_ns"
        )
        main.sort(key=lambda r: r[key])
        first = main[0][key]

        def request(r: dict[str, Any]) -> TraceRequest:
            where = f"{origin}: request {r.get('index')}"
            return TraceRequest(
                _count_field(r, ("prompt_tokens",), where),
                _count_field(r, ("output_tokens",), where),
                (r[key] - first) / 1e9,
            )

        return cls(tuple(request(r) for r in main))


def _bench_records(path: Path) -> list[dict[str, Any]] | None:
    """The rows of a bench per-request file (`<label>.requests.jsonl`: every row has an
    integer `sent_ns`), or None for any other file."""
    rows = []
    try:
        for obj in jsonl.read_rows(path):
            if not isinstance(obj, dict) or not is_int(obj.get("sent_ns")):
                return None
            rows.append(obj)
    except (jsonl.DecodeError, UnicodeDecodeError):
        return None
    return rows or None


def _pick(obj: dict[str, Any], keys: tuple[str, ...], where: str) -> tuple[str, Any] | None:
    present = [k for k in keys if k in obj]
    if len(present) > 1:
        raise ValueError(f"{where}: {present[0]}: given twice, as {' and '.join(present)}")
    return (present[0], obj[present[0]]) if present else None


def _count_field(obj: dict[str, Any], keys: tuple[str, ...], where: str) -> int:
    picked = _pick(obj, keys, where)
    if picked is None:
        aliases = ", ".join(keys[1:])
        raise ValueError(f"{where}: {keys[0]}: missing (also accepted as {aliases})")
    key, value = picked
    if not is_int(value):
        raise ValueError(f"{where}: {key}: must be an integer, got {json.dumps(value)}")
    if value <= 0:
        raise ValueError(f"{where}: {key}: must be >= 1, got {value}")
    return int(value)


def _hash_ids_field(
    obj: dict[str, Any], prompt: int, block_tokens: int, where: str
) -> tuple[int, ...]:
    """Mooncake's `hash_ids`: a list of integers >= 0, no more than the prompt's blocks."""
    if "hash_ids" not in obj:
        return ()
    value = obj["hash_ids"]
    if not isinstance(value, list) or not all(is_int(h) and h >= 0 for h in value):
        raise ValueError(f"{where}: hash_ids: must be a list of integers >= 0")
    if len(value) > -(-prompt // block_tokens):
        raise ValueError(
            f"{where}: hash_ids: {len(value)} blocks of {block_tokens} tokens do not fit "
            f"a {prompt}-token prompt (see --trace-block-size)"
        )
    return tuple(int(h) for h in value)


def _session_fields(
    obj: dict[str, Any], sessions: dict[str | int, int], where: str
) -> tuple[int | None, float | None]:
    """(session number, delay in seconds): the number by the session's first appearance;
    the delay None on a session's first turn and on rows of no session."""
    if "session_id" not in obj:
        if "delay" in obj:
            raise ValueError(f"{where}: delay: only a session's turns (session_id) have one")
        return None, None
    key = obj["session_id"]
    if not isinstance(key, str | int) or isinstance(key, bool):
        raise ValueError(f"{where}: session_id: must be a string or an integer")
    first = key not in sessions
    number = sessions.setdefault(key, len(sessions))
    if first:
        if "delay" in obj:
            raise ValueError(f"{where}: delay: the first turn of session {key!r} has none")
        return number, None
    delay = obj.get("delay", 0)
    if not is_number(delay) or not math.isfinite(delay) or delay < 0:
        raise ValueError(f"{where}: delay: must be a finite number of ms >= 0, got {delay!r}")
    return number, float(delay) * 1e-3


def _model_field(obj: dict[str, Any], where: str) -> str | None:
    """A row's optional `model`: a non-empty string."""
    model = obj.get("model")
    if model is None:
        return None
    if not isinstance(model, str) or not model:
        raise ValueError(f"{where}: model: expected a non-empty string, got {model!r}")
    return model


def _arrival_field(obj: dict[str, Any], where: str) -> float | None:
    picked = _pick(obj, tuple(_ARRIVAL_KEYS), where)
    if picked is None:
        return None
    key, value = picked
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{where}: {key}: must be a finite number, got {json.dumps(value)}")
    if value < 0:
        raise ValueError(f"{where}: {key}: must be >= 0, got {value}")
    return float(value) * _ARRIVAL_KEYS[key]


_LENGTH_FORMS = "'<tokens>', 'uniform:<mean>:<range_ratio>' or 'lognormal:<median>:<sigma>'"


def parse_length(text: str) -> Fixed | Uniform | LogNormal:
    """Parse a CLI length: '512', 'uniform:512:0.5' or 'lognormal:512:0.6'.

    `str()` of the result parses back to an equal object.
    """
    parts = text.strip().split(":")
    kind = parts[0].lower()
    try:
        if len(parts) == 1 and kind.lstrip("+-").isdigit():
            return Fixed(_parse_int(parts[0], "tokens"))
        if kind == "uniform" and len(parts) == 3:
            return Uniform(_parse_int(parts[1], "mean"), _parse_float(parts[2], "range_ratio"))
        if kind == "lognormal" and len(parts) == 3:
            return LogNormal(_parse_float(parts[1], "median"), _parse_float(parts[2], "sigma"))
    except ValueError as e:
        raise ValueError(f"bad length {text!r}: {e}") from None
    raise ValueError(f"bad length {text!r}: expected {_LENGTH_FORMS}")


def _parse_int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None


def _parse_float(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {text!r}")
    return value
