"""Prometheus counters for what the guard does: injected faults and refused requests.

A `GuardObserver` and a prometheus_client collector; the server registers it in
the same registry as the engine's metrics (`PrometheusMetrics.registry`), so
/metrics shows both. Series carry vLLM's labels, like every other series there:
- `memorywall:faults_injected_total{kind}`: faults that took effect, by kind
  (error, abort, stall, slow); an abort counts when it cuts a stream.
- `memorywall:requests_rejected_total{reason}`: requests refused before the
  engine saw them; `max_waiting` is the only reason so far.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from memorywall.server.engine.api import FaultKind
from memorywall.server.telemetry_labels import ENGINE_INDEX, LABEL_NAMES

REJECT_REASONS = ("max_waiting",)


class GuardMetrics:
    def __init__(self, model_name: str) -> None:
        self._labels = [model_name, ENGINE_INDEX]
        self.faults = dict.fromkeys(FaultKind, 0)
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)

    # GuardObserver

    def on_fault(self, kind: FaultKind) -> None:
        self.faults[kind] += 1

    def on_rejected(self, reason: str) -> None:
        self.rejected[reason] += 1

    # prometheus_client's Collector protocol

    def collect(self) -> Iterator[Metric]:
        faults = CounterMetricFamily(
            "memorywall:faults_injected",
            "Faults injected on purpose (--faults, x-memorywall-fault), by kind.",
            labels=[*LABEL_NAMES, "kind"],
        )
        for kind, count in self.faults.items():
            faults.add_metric([*self._labels, kind.value], count)
        yield faults
        rejected = CounterMetricFamily(
            "memorywall:requests_rejected",
            "Requests refused before the engine saw them, by reason.",
            labels=[*LABEL_NAMES, "reason"],
        )
        for reason, count in self.rejected.items():
            rejected.add_metric([*self._labels, reason], count)
        yield rejected
