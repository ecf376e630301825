"""A worker's role in disaggregated serving and what its partner learns of it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum
from typing import Any

from memorywall.core.deployment import Deployment, DeploymentNames
from memorywall.core.kv_transfer import LinkKind
from memorywall.errors import ConfigError, DisaggregationError

DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's, and what smg assumes when a prefill URL names none


class Role(StrEnum):
    BOTH = "both"  # prefill and decode on this worker (no disaggregation)
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, kw_only=True)
class Bootstrap:
    """Where a request's two halves meet: the prefill worker's bootstrap server and room."""

    host: str
    port: int
    room: int


@dataclass(frozen=True, kw_only=True)
class DeploymentRef(DeploymentNames):
    """Enough for a partner process on this host to rebuild a worker's deployment: its names
    as given to `serve`, with the devices and tensor/pipeline split it got (`build`)."""

    @classmethod
    def of(cls, d: Deployment, names: DeploymentNames | None = None) -> DeploymentRef:
        """`d`, by the names it was built from (default: its profiles' built-in names)."""
        given = (names or DeploymentNames.of(d)).resolved(d)
        return cls(**given.as_dict())

    @classmethod
    def from_dict(cls, data: Any) -> DeploymentRef:
        try:
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        except (TypeError, KeyError) as e:
            raise DisaggregationError(f"bad deployment from the prefill worker: {e}") from e


@dataclass(frozen=True, kw_only=True)
class PdConfig:
    role: Role = Role.BOTH
    link: LinkKind | float = LinkKind.NIC  # `--kv-link`: nvlink, nic or GB/s
    layer_overlap: bool = False  # send layer i's KV while layer i+1 prefills
    bootstrap_port: int = DEFAULT_BOOTSTRAP_PORT  # a prefill worker's rendezvous (0: any free)
    # How long a half waits for its partner (to arrive, or to finish the transfer) before it
    # ends with DEADLINE_EXCEEDED.
    partner_timeout_s: float = 30.0
    deployment: DeploymentRef | None = None  # this worker's, as given (default: its names)

    def __post_init__(self) -> None:
        if not self.partner_timeout_s > 0:
            raise ConfigError(
                f"--pd-timeout: must be a positive number of seconds, got {self.partner_timeout_s}"
            )
