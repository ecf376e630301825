"""Disaggregated serving: prefill and decode halves of a request on different workers.

smg's PD mode sends one request to a prefill worker and a decode worker at once,
with the same bootstrap room. The prefill worker (`--role prefill`) runs the
prompt, then holds its half open on a loopback bootstrap server until the decode
worker (`--role decode`) has taken the KV; the decode worker times the transfer
with `core.kv_transfer` and decodes from when the KV lands.
"""

from memorywall.server.pd.config import Bootstrap, DeploymentRef, PdConfig, Role
from memorywall.server.pd.halves import Disaggregation, disaggregation_for

__all__ = ["Bootstrap", "DeploymentRef", "Disaggregation", "PdConfig", "Role", "disaggregation_for"]
