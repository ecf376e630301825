"""Faults on purpose: what `--faults SPEC` and `x-memorywall-fault` ask for, and each
request's fate, drawn from a seed in arrival order.

A spec is comma-separated `KIND:RATE[:ARG]` rules (llm-d's inference simulator
has the same idea as failure-injection rate and types):

- `error[:STATUS]`: refuse the request. STATUS is `unavailable` (default; gRPC
  UNAVAILABLE, HTTP 503), `resource_exhausted` (429), `internal` (500) or
  `deadline_exceeded` (504).
- `abort[:N]`: end the stream with UNAVAILABLE / an error event after N tokens
  (default 1).
- `stall[:S]`: hold the first token S seconds longer (default 1); every later
  token keeps its modelled gap, so TTFT and E2E grow by S.
- `slow[:F]`: decode F times slower (default 2): each modelled inter-token gap
  of the request is stretched by F.

Request i (0-based, in arrival order) draws the i-th uniform number of a
generator seeded with `--fault-seed`; the rules share [0, 1) in spec order, so
rates add up (to at most 1) and a rerun with the same seed and order fails the
same requests the same way. No I/O here: `guard.py` applies the fates.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

from memorywall.errors import (
    ConfigError,
    InjectedFaultError,
    InjectedInternalError,
    InjectedOverloadError,
    InjectedTimeoutError,
    InjectedUnavailableError,
    InvalidRequestError,
)


class FaultKind(Enum):
    ERROR = "error"
    ABORT = "abort"
    STALL = "stall"
    SLOW = "slow"


class FaultStatus(Enum):
    """The statuses an `error` fault may answer with, each its own domain error."""

    UNAVAILABLE = "unavailable"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    INTERNAL = "internal"
    DEADLINE_EXCEEDED = "deadline_exceeded"


_ERROR_FOR: dict[FaultStatus, type[InjectedFaultError]] = {
    FaultStatus.UNAVAILABLE: InjectedUnavailableError,
    FaultStatus.RESOURCE_EXHAUSTED: InjectedOverloadError,
    FaultStatus.INTERNAL: InjectedInternalError,
    FaultStatus.DEADLINE_EXCEEDED: InjectedTimeoutError,
}


@dataclass(frozen=True, kw_only=True)
class Fault:
    """One request's fate. Fields other than `kind` default to no effect."""

    kind: FaultKind
    status: FaultStatus = FaultStatus.UNAVAILABLE  # error
    after_tokens: int = 0  # abort
    stall_s: float = 0.0  # stall
    slowdown: float = 1.0  # slow

    def __str__(self) -> str:
        arg = {
            FaultKind.ERROR: self.status.value,
            FaultKind.ABORT: str(self.after_tokens),
            FaultKind.STALL: f"{self.stall_s:g}",
            FaultKind.SLOW: f"{self.slowdown:g}",
        }[self.kind]
        return f"{self.kind.value}:{arg}"

    def error(self, message: str) -> InjectedFaultError:
        """The domain error this fault ends its request with."""
        status = self.status if self.kind is FaultKind.ERROR else FaultStatus.UNAVAILABLE
        return _ERROR_FOR[status](f"fault injected ({self}): {message}", fault=str(self))


@dataclass(frozen=True)
class FaultRule:
    fault: Fault
    rate: float


def _number(kind: type, text: str, what: str, *, low: float, inclusive: bool) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{what}: expected a number, got {text!r}") from None
    if not np.isfinite(value) or value < low or (value == low and not inclusive):
        bound = f">= {low:g}" if inclusive else f"> {low:g}"
        raise ConfigError(f"{what}: must be finite and {bound}, got {text!r}")
    return value


def parse_rule(text: str) -> FaultRule:
    """One `KIND:RATE[:ARG]` rule; raises ConfigError naming what is wrong."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise ConfigError(f"fault {text!r}: expected KIND:RATE[:ARG]")
    try:
        kind = FaultKind(parts[0].lower())
    except ValueError:
        kinds = ", ".join(k.value for k in FaultKind)
        raise ConfigError(f"fault {text!r}: unknown kind {parts[0]!r} (one of {kinds})") from None
    rate = _number(float, parts[1], f"fault {text!r} rate", low=0.0, inclusive=True)
    if rate > 1:
        raise ConfigError(f"fault {text!r} rate: must be in [0, 1], got {parts[1]!r}")
    arg = parts[2] if len(parts) == 3 else None
    what = f"fault {text!r} argument"
    if kind is FaultKind.ERROR:
        try:
            fault = Fault(kind=kind, status=FaultStatus((arg or "unavailable").lower()))
        except ValueError:
            names = ", ".join(s.value for s in FaultStatus)
            raise ConfigError(f"{what}: unknown status {arg!r} (one of {names})") from None
    elif kind is FaultKind.ABORT:
        tokens = _number(int, arg or "1", what, low=0, inclusive=True)
        fault = Fault(kind=kind, after_tokens=int(tokens))
    elif kind is FaultKind.STALL:
        fault = Fault(kind=kind, stall_s=_number(float, arg or "1", what, low=0, inclusive=False))
    else:
        fault = Fault(kind=kind, slowdown=_number(float, arg or "2", what, low=1, inclusive=True))
    return FaultRule(fault, rate)


def fault_from_header(value: str | None) -> FaultRule | None:
    """A request's own `KIND:RATE[:ARG]` rule (the `x-memorywall-fault` header, read the same
    way by every front); a malformed one is an InvalidRequestError."""
    if value is None:
        return None
    try:
        return parse_rule(value)
    except ConfigError as e:
        raise InvalidRequestError(f"x-memorywall-fault: {e}") from None


def refuse_fault(fault: FaultRule | None) -> None:
    """What an `EngineClient` that injects no faults does with a request's own rule: refuses
    it (only `guard.GuardedEngine` applies them)."""
    if fault is not None:
        raise InvalidRequestError("x-memorywall-fault: this server does not inject faults")


def parse_spec(text: str) -> tuple[FaultRule, ...]:
    """Comma-separated rules whose rates add up to at most 1."""
    rules = tuple(parse_rule(part) for part in text.split(",") if part.strip())
    if not rules:
        raise ConfigError(f"faults {text!r}: no KIND:RATE rules")
    total = sum(r.rate for r in rules)
    if total > 1 + 1e-9:
        raise ConfigError(f"faults {text!r}: rates add up to {total:g}, more than 1")
    return rules


class FaultPlan:
    """Draws each arriving request's fate: one uniform number per arrival, in order."""

    def __init__(self, rules: tuple[FaultRule, ...], seed: int) -> None:
        self.rules = rules
        self._rng = np.random.default_rng(seed)
        self.arrivals = 0

    def draw(self, override: FaultRule | None = None) -> Fault | None:
        """The next arrival's fault, or None. `override` (a request's own rule, from its
        header) replaces the spec for this arrival; the draw is taken either way, so the
        arrivals after it keep their fates."""
        u = float(self._rng.random())
        self.arrivals += 1
        rules = (override,) if override is not None else self.rules
        edge = 0.0
        for rule in rules:
            edge += rule.rate
            if u < edge:
                return rule.fault
        return None
