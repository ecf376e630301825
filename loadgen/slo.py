"""Service-level objectives for goodput: per-request TTFT, TPOT and E2E latency bounds."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_SLO_KEYS = ("ttft", "tpot", "e2el")
_SLO_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_SLO_VALUE = re.compile(r"^([0-9eE.+-]+?)\s*(ns|us|ms|s)?$")


@dataclass(frozen=True, slots=True, kw_only=True)
class Slo:
    """Per-request bounds in seconds; a request is good when it meets every one given."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2el_s: float | None = None

    def __post_init__(self) -> None:
        bounds = {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2el_s": self.e2el_s}
        if all(b is None for b in bounds.values()):
            raise ValueError("SLO has no bound: give at least one of ttft_s, tpot_s, e2el_s")
        for name, b in bounds.items():
            if b is not None and not (math.isfinite(b) and b >= 0):
                raise ValueError(f"SLO {name}={b!r}: must be a finite number >= 0")

    def met(self, *, ttft_s: float, tpot_s: float | None, e2el_s: float) -> bool:
        """No TPOT (a single output token) passes a TPOT bound, as in vLLM."""
        return (
            (self.ttft_s is None or ttft_s <= self.ttft_s)
            and (self.tpot_s is None or tpot_s is None or tpot_s <= self.tpot_s)
            and (self.e2el_s is None or e2el_s <= self.e2el_s)
        )


def parse_slo(text: str) -> Slo:
    """Parse `"ttft=500ms,tpot=30ms,e2el=2s"` (units ns, us, ms, s) into an `Slo`."""
    if not text.strip():
        raise ValueError("empty SLO: expected e.g. 'ttft=500ms,tpot=30ms,e2el=2s'")
    bounds: dict[str, float] = {}
    for part in text.split(","):
        item = part.strip()
        if not item:
            raise ValueError(f"empty item in SLO {text!r}")
        key, eq, raw = (s.strip() for s in item.partition("="))
        if not eq:
            raise ValueError(f"SLO item {item!r}: expected key=value")
        if key not in _SLO_KEYS:
            raise ValueError(f"SLO item {item!r}: unknown key {key!r} (ttft, tpot or e2el)")
        if key in bounds:
            raise ValueError(f"SLO item {item!r}: {key} given twice")
        m = _SLO_VALUE.match(raw)
        if not raw or m is None:
            raise ValueError(f"SLO item {item!r}: value must be a number with a unit")
        number, unit = m.groups()
        if unit is None:
            raise ValueError(f"SLO item {item!r}: missing unit (ns, us, ms or s)")
        try:
            value = float(number)
        except ValueError:
            raise ValueError(f"SLO item {item!r}: {number!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"SLO item {item!r}: must be a finite number >= 0")
        bounds[key] = value * _SLO_UNITS[unit]
    return Slo(**{f"{k}_s": v for k, v in bounds.items()})
