"""The labels every Prometheus series of a server carries, shared by every collector.

vLLM labels each series `model_name` and `engine` (the engine core's index:
always "0", one engine core). The fronts' metrics (`fronts/metrics.py`,
`fronts/guard_metrics.py`) and disaggregation's (`pd/metrics.py`) both read
them here, so neither imports the other.
"""

from __future__ import annotations

LABEL_NAMES = ("model_name", "engine")
ENGINE_INDEX = "0"
