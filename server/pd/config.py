"""A worker's role in disaggregated serving and what its partner learns of it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

from memorywall.core import Placement, Precision, load_hardware, load_model, plan_deployment
from memorywall.core.deployment import Deployment
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
class DeploymentRef:
    """Enough for a partner process on this host to rebuild a worker's deployment."""

    hardware: str  # a built-in name or a profile path, as given to `serve`
    model: str
    devices: int
    weight_precision: str
    kv_precision: str
    placement: str

    @classmethod
    def of(
        cls, d: Deployment, *, hardware: str | None = None, model: str | None = None
    ) -> DeploymentRef:
        return cls(
            hardware=hardware or d.hardware.name,
            model=model or d.model.name,
            devices=d.devices,
            weight_precision=d.weight_precision.value,
            kv_precision=d.kv_precision.value,
            placement=d.placement.value,
        )

    def build(self) -> Deployment:
        return plan_deployment(
            load_hardware(self.hardware),
            load_model(self.model),
            devices=self.devices,
            weight_precision=Precision(self.weight_precision),
            kv_precision=Precision(self.kv_precision),
            placement=Placement.parse(self.placement),
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> DeploymentRef:
        try:
            return cls(**{k: data[k] for k in _REF_FIELDS})
        except (TypeError, KeyError) as e:
            raise DisaggregationError(f"bad deployment from the prefill worker: {e}") from e


_REF_FIELDS = tuple(f.name for f in fields(DeploymentRef))


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
