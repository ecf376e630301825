"""Emission lag: when tokens were handed to their stream minus when the model said they were due."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LagSummary:
    samples: int
    mean_s: float
    p50_s: float
    p99_s: float
    max_s: float
    late_steps: int
    threshold_s: float


class LagTracker:
    """The last `window` lag samples in a ring, plus a count of those over `threshold_s`."""

    def __init__(self, window: int = 65536, threshold_s: float = 0.010) -> None:
        self._ring = np.zeros(window)
        self._n = 0
        self.threshold_s = threshold_s
        self.late = 0

    def record(self, lag_s: float) -> None:
        self._ring[self._n % len(self._ring)] = lag_s
        self._n += 1
        if lag_s > self.threshold_s:
            self.late += 1

    def summary(self) -> LagSummary:
        data = self._ring[: min(self._n, len(self._ring))]
        if not len(data):
            return LagSummary(0, 0.0, 0.0, 0.0, 0.0, self.late, self.threshold_s)
        p50, p99 = np.percentile(data, [50, 99])
        return LagSummary(
            self._n,
            float(data.mean()),
            float(p50),
            float(p99),
            float(data.max()),
            self.late,
            self.threshold_s,
        )
