"""One scrape of a worker's `/metrics`: the series the dashboard reads, parsed once.

The worker's Prometheus text (vLLM's names, `memorywall:` for the emulator's own) is read
with prometheus_client's parser. Each series is summed over its label sets (one worker
serves one model on one engine, so there is one set, but a sum stays right if there were
more); a histogram keeps its cumulative buckets by upper bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

# The series the dashboard reads (sample names, as the text format spells them).
GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
ENERGY_J = "memorywall:modelled_energy_joules_total"
POWER_W = "memorywall:modelled_power_watts"
RATED_POWER_W = "memorywall:rated_power_watts"
DEGRADED = "memorywall:degraded"
HOST_STALL_S = "memorywall:host_stall_seconds_total"
TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
LAG = "memorywall:emulation_lag_seconds"
FINISHED = "vllm:request_success_total"

HISTOGRAMS = (TTFT, ITL, LAG)


class ScrapeError(ValueError):
    """A `/metrics` body that is not Prometheus text."""


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts by upper bound (the last is +Inf), and the sum."""

    bounds: tuple[float, ...]
    counts: tuple[float, ...]
    sum: float

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def minus(self, earlier: Histogram) -> Histogram:
        """The observations made since `earlier`. A restarted worker is caught before this,
        by its counters (`derive.is_reset`); other buckets than `earlier`'s mean another
        server: then all of `self`."""
        if earlier.bounds != self.bounds:
            return self
        counts = tuple(a - b for a, b in zip(self.counts, earlier.counts, strict=True))
        return Histogram(self.bounds, counts, self.sum - earlier.sum)

    def quantile(self, q: float) -> float | None:
        """Prometheus' `histogram_quantile`: linear within the bucket the rank falls in, the
        largest finite bound if it falls in +Inf; None with no observations."""
        total = self.count
        if total <= 0 or not self.bounds:
            return None
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            if count >= rank:
                if math.isinf(bound):
                    return lower_bound
                if count == lower_count:
                    return bound
                return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                    count - lower_count
                )
            lower_bound, lower_count = bound, count
        return lower_bound

    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None


@dataclass(frozen=True)
class Scrape:
    """One worker's `/metrics` at one moment (`at_s`: the poller's monotonic clock)."""

    at_s: float
    values: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)

    def value(self, name: str) -> float | None:
        return self.values.get(name)


def parse(text: str, at_s: float) -> Scrape:
    """The series of a Prometheus text body; ScrapeError if it does not parse."""
    values: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    sums: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, value = sample.name, float(sample.value)
                base = name.removesuffix("_bucket")
                if name.endswith("_bucket") and base in HISTOGRAMS:
                    le = float(sample.labels["le"])
                    per_le = buckets.setdefault(base, {})
                    per_le[le] = per_le.get(le, 0.0) + value
                elif name.endswith("_sum") and name.removesuffix("_sum") in HISTOGRAMS:
                    key = name.removesuffix("_sum")
                    sums[key] = sums.get(key, 0.0) + value
                else:
                    values[name] = values.get(name, 0.0) + value
    except (ValueError, KeyError, TypeError) as e:
        raise ScrapeError(f"not Prometheus text ({e})") from None
    histograms = {
        name: Histogram(
            tuple(sorted(per_le)), tuple(per_le[b] for b in sorted(per_le)), sums.get(name, 0.0)
        )
        for name, per_le in buckets.items()
    }
    return Scrape(at_s, values, histograms)
