"""When to send: open-loop arrival schedules, drawn up front.

Offsets are seconds after the run's start, one per request, non-decreasing. They are drawn
in full before the run from an injected, seeded `numpy.random.Generator` (never the global
random state), and a driver sends each request at its absolute offset.

Semantics follow vLLM `bench serve` (`vllm/benchmarks/serve.py`, `get_request`):

- Gaps between requests are Gamma(shape=burstiness, scale=1/(rate*burstiness)): mean 1/rate,
  coefficient of variation 1/sqrt(burstiness). Burstiness 1 is a Poisson process
  (exponential gaps); below 1 is burstier, above 1 more even; infinite burstiness is the
  constant gap 1/rate. An infinite rate sends everything at offset 0.
- The first request comes after one gap, not at 0: offset[i] = gap[0] + ... + gap[i]
  (vLLM's `delay_ts` is the cumulative sum of all gaps, the first included).
- vLLM then rescales every offset so the last one lands on exactly n/rate, to steady
  throughput across seeds. That is off here by default (the offsets stay a true renewal
  process); pass `normalize_total=True` to do the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TypeVar

import numpy as np

from memorywall.loadgen.records import RequestSpec

__all__ = ["constant", "gamma", "poisson", "split_for_workers", "with_offsets"]

T = TypeVar("T")  # what is dealt: specs, or whole sessions of them


def _check_rate(rate_per_s: float) -> float:
    if isinstance(rate_per_s, bool) or not isinstance(rate_per_s, int | float | np.number):
        raise ValueError(f"rate must be a number > 0 (requests/s), got {rate_per_s!r}")
    if math.isnan(rate_per_s) or rate_per_s <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate_per_s!r}")
    return float(rate_per_s)


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"number of requests must be an integer >= 1, got {n!r}")
    return int(n)


def _cumulative(gaps_s: np.ndarray, rate_per_s: float, normalize_total: bool) -> np.ndarray:
    offsets = np.cumsum(gaps_s, dtype=np.float64)
    if normalize_total and offsets[-1] > 0 and math.isfinite(rate_per_s):
        offsets *= (len(offsets) / rate_per_s) / offsets[-1]
    return offsets


def gamma(
    rate_per_s: float,
    burstiness: float,
    n: int,
    rng: np.random.Generator,
    *,
    normalize_total: bool = False,
) -> np.ndarray:
    """Offsets (s) of `n` arrivals with Gamma(burstiness, 1/(rate*burstiness)) gaps.

    offset[i] = sum of gaps 0..i, so the first arrival is one gap after the start.
    Draws exactly `n` gamma variates from `rng` (none when rate or burstiness is infinite).
    """
    rate_per_s = _check_rate(rate_per_s)
    n = _check_n(n)
    if isinstance(burstiness, bool) or not isinstance(burstiness, int | float | np.number):
        raise ValueError(f"burstiness must be a number > 0, got {burstiness!r}")
    if math.isnan(burstiness) or burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness!r}")
    if math.isinf(rate_per_s):
        return np.zeros(n, dtype=np.float64)
    if math.isinf(burstiness):
        return constant(rate_per_s, n)
    scale_s = 1.0 / (rate_per_s * burstiness)
    gaps_s = rng.gamma(shape=float(burstiness), scale=scale_s, size=n)
    return _cumulative(gaps_s, rate_per_s, normalize_total)


def poisson(
    rate_per_s: float, n: int, rng: np.random.Generator, *, normalize_total: bool = False
) -> np.ndarray:
    """Offsets (s) of a Poisson process: exponential gaps with mean 1/rate.

    The same draws as `gamma(rate_per_s, 1.0, n, rng)` (vLLM's default burstiness).
    """
    return gamma(rate_per_s, 1.0, n, rng, normalize_total=normalize_total)


def constant(rate_per_s: float, n: int) -> np.ndarray:
    """Offsets (s) evenly spaced 1/rate apart: (i + 1) / rate, first after one gap."""
    rate_per_s = _check_rate(rate_per_s)
    n = _check_n(n)
    if math.isinf(rate_per_s):
        return np.zeros(n, dtype=np.float64)
    return np.arange(1, n + 1, dtype=np.float64) / rate_per_s


def with_offsets(
    specs: Sequence[RequestSpec], offsets_s: Sequence[float] | np.ndarray
) -> list[RequestSpec]:
    """Copies of `specs` with `offset_s` set, pairing the i-th spec with the i-th offset.

    Offsets must be as many as specs, finite, >= 0 and non-decreasing.
    """
    offsets = np.asarray(offsets_s, dtype=np.float64)
    if offsets.ndim != 1 or len(offsets) != len(specs):
        raise ValueError(f"{len(specs)} specs but {offsets.size} offsets")
    if not np.all(np.isfinite(offsets)) or np.any(offsets < 0):
        raise ValueError("offsets must be finite and >= 0 seconds")
    if np.any(np.diff(offsets) < 0):
        i = int(np.argmax(np.diff(offsets) < 0)) + 1
        raise ValueError(f"offsets must not decrease: offset {i} is before offset {i - 1}")
    return [replace(spec, offset_s=o) for spec, o in zip(specs, offsets.tolist(), strict=True)]


def split_for_workers(specs: Sequence[T], workers: int) -> list[list[T]]:
    """Deal specs round-robin to `workers` processes: worker w gets positions w, w+N, w+2N...

    Each spec keeps its absolute `offset_s` and `index`, so the workers together replay the
    global schedule; each worker's list stays in the input order. A worker may get an empty
    list when there are fewer specs than workers.
    """
    if isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    return [list(specs[w :: int(workers)]) for w in range(int(workers))]
