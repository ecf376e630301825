"""KV transfer series for /metrics, counted on the decode worker where the KV lands.

The decode worker's own vLLM series see its part of a request: its
`vllm:time_to_first_token_seconds` runs from the KV's landing to the first token
(one decode step when nothing queues); the client's TTFT adds the remote prefill
and the transfer, as `Finished.ttft_s` does.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from memorywall.core.kv_transfer import KvTransfer
from memorywall.server.telemetry_labels import ENGINE_INDEX, LABEL_NAMES

# 10 us (a short prompt over NVLink) up to tens of seconds (a long one over a slow NIC).
KV_TRANSFER_BUCKETS_S = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class KvTransferMetrics:
    """A Prometheus collector: `memorywall:kv_transfer_seconds` (each whole transfer, modelled)
    and `memorywall:kv_transfer_bytes_total`. Register it beside the engine's metrics."""

    def __init__(self, model_name: str) -> None:
        self._labels = [model_name, ENGINE_INDEX]
        self._counts = [0] * (len(KV_TRANSFER_BUCKETS_S) + 1)
        self._sum_s = 0.0
        self._bytes = 0.0

    def on_transfer(self, transfer: KvTransfer) -> None:
        self._counts[bisect_left(KV_TRANSFER_BUCKETS_S, transfer.time_s)] += 1
        self._sum_s += transfer.time_s
        self._bytes += transfer.bytes

    def collect(self) -> Iterator[Metric]:
        buckets, total = [], 0
        for bound, count in zip(KV_TRANSFER_BUCKETS_S, self._counts, strict=False):
            total += count
            buckets.append((floatToGoString(bound), total))
        buckets.append(("+Inf", total + self._counts[-1]))
        seconds = HistogramMetricFamily(
            "memorywall:kv_transfer_seconds",
            "Modelled time of each KV transfer from a prefill worker to this one.",
            labels=LABEL_NAMES,
        )
        seconds.add_metric(self._labels, buckets, self._sum_s)
        yield seconds
        sent = CounterMetricFamily(
            "memorywall:kv_transfer_bytes",
            "KV cache bytes received from prefill workers.",
            labels=LABEL_NAMES,
        )
        sent.add_metric(self._labels, self._bytes)
        yield sent
