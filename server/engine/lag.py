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


@dataclass(frozen=True)
class StallSummary:
    """Host stalls: the engine woke past a deadline by more than its tolerance, so it moved the
    modelled timeline later instead of running steps back to back to catch up."""

    stalls: int
    stalled_s: float  # modelled time the stalls added, in total
    degraded: bool  # a stall within the last `window_s`
    window_s: float


class StallTracker:
    """Decides when the host is late enough to re-anchor the timeline, and counts the cost.

    The tolerance is `tolerance_s`, or `tolerance_fraction` of the step when that is shorter:
    a wafer's 0.5 ms step may slip by a quarter millisecond, not by two of itself.
    """

    def __init__(
        self, *, tolerance_s: float = 0.001, tolerance_fraction: float = 0.5, window_s: float = 5.0
    ) -> None:
        self.tolerance_s = tolerance_s
        self.tolerance_fraction = tolerance_fraction
        self.window_s = window_s
        self.stalls = 0
        self.stalled_s = 0.0
        self._last_s = -float("inf")
        self._reported_s = -float("inf")

    def tolerance(self, step_s: float | None = None) -> float:
        """How late a wake-up after a step of `step_s` may be (None: after idle)."""
        if step_s is not None and step_s * self.tolerance_fraction < self.tolerance_s:
            return step_s * self.tolerance_fraction
        return self.tolerance_s

    def too_late(self, late_s: float, step_s: float | None = None) -> bool:
        """Whether a wake-up `late_s` past its deadline breaks pacing (then call `record`)."""
        return late_s > self.tolerance(step_s)

    def record(self, lost_s: float, now_s: float) -> bool:
        """Count a stall that cost `lost_s`; True when it opens a new report interval."""
        self.stalls += 1
        self.stalled_s += lost_s
        self._last_s = now_s
        if now_s - self._reported_s >= self.window_s:
            self._reported_s = now_s
            return True
        return False

    def summary(self, now_s: float) -> StallSummary:
        return StallSummary(
            self.stalls, self.stalled_s, now_s - self._last_s < self.window_s, self.window_s
        )
