"""KV-cache transfer between a prefill pool and a decode pool (disaggregated serving).

A request prefilled on one deployment decodes on another once its KV cache
has crossed the link between them:

    transfer_s = latency_s + tokens * kv_bytes_per_token / bandwidth_bytes_per_s

`kv_bytes_per_token` is the model's logical KV (every layer's K and V, or its
latent cache, at the KV precision), sent once however the receiving side
shards or replicates it. The link is data with sources, taken from the two
hardware profiles:

- `nvlink`: both pools on one scale-up domain (same GPU kind, devices
  together within `scale_up_domain`): the slower side's per-device scale-up
  bandwidth times the devices sending in parallel.
- `nic` (the default): each device's external I/O (a GPU's RDMA NIC, a
  CS-3's 12 x 100 GbE), the pool with less aggregate I/O setting the pace.
- a user-given bandwidth (`KvLinkSpec.gbps`, decimal GB/s) with the NIC
  latency of the two profiles.

With layer-by-layer overlap, layer i's KV leaves while layer i+1 computes,
so only the part of the transfer that outlasts the prefill, and at least the
last layer's share, adds to TTFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from memorywall.core.deployment import Deployment
from memorywall.core.hardware import DeviceKind
from memorywall.errors import ConfigError


class LinkKind(StrEnum):
    NVLINK = "nvlink"
    NIC = "nic"
    CUSTOM = "custom"


@dataclass(frozen=True, kw_only=True)
class KvLink:
    kind: LinkKind
    bandwidth_bytes_per_s: float
    latency_s: float
    source: str

    def describe(self) -> str:
        return f"{self.kind} {self.bandwidth_bytes_per_s / 1e9:,.0f} GB/s"


@dataclass(frozen=True, kw_only=True)
class KvTransfer:
    tokens: int
    bytes: float
    time_s: float  # the whole transfer
    exposed_s: float  # what adds to TTFT (less than time_s with layer overlap)


def parse_link(text: str) -> LinkKind | float:
    """`nvlink`, `nic`, or a bandwidth in decimal GB/s; a one-line ConfigError otherwise."""
    t = text.strip().lower()
    if t in (LinkKind.NVLINK, LinkKind.NIC):
        return LinkKind(t)
    try:
        gbps = float(t)
    except ValueError:
        raise ConfigError(
            f"--kv-link: expected nvlink, nic or a bandwidth in GB/s, got {text!r}"
        ) from None
    if not gbps > 0 or gbps == float("inf"):
        raise ConfigError(f"--kv-link: bandwidth must be a positive number of GB/s, got {text!r}")
    return gbps


def kv_link(
    prefill: Deployment, decode: Deployment, spec: LinkKind | float = LinkKind.NIC
) -> KvLink:
    """The link a request's KV crosses from `prefill` to `decode`."""
    p, d = prefill.hardware, decode.hardware
    nic_latency = max(p.external_io.latency_s, d.external_io.latency_s)
    if isinstance(spec, float | int) and not isinstance(spec, LinkKind):
        return KvLink(
            kind=LinkKind.CUSTOM,
            bandwidth_bytes_per_s=float(spec) * 1e9,
            latency_s=nic_latency,
            source=f"user-given {float(spec):g} GB/s; latency from the profiles' external I/O",
        )
    if spec is LinkKind.NVLINK:
        same_domain = (
            p.kind is DeviceKind.GPU
            and p.name == d.name
            and prefill.devices + decode.devices <= p.scale_up_domain
        )
        if not same_domain:
            raise ConfigError(
                f"--kv-link nvlink: {p.name} x{prefill.devices} and {d.name} x{decode.devices} "
                f"are not one scale-up domain (same GPU kind, at most {p.scale_up_domain} "
                "devices together); use nic or a bandwidth"
            )
        lanes = min(prefill.devices, decode.devices)
        return KvLink(
            kind=LinkKind.NVLINK,
            bandwidth_bytes_per_s=p.scale_up.bandwidth_bytes_per_s * lanes,
            latency_s=p.scale_up.latency_s,
            source=f"{p.name} profile: scale_up bandwidth per device x {lanes} devices",
        )
    send = p.external_io.bandwidth_bytes_per_s * prefill.devices
    receive = d.external_io.bandwidth_bytes_per_s * decode.devices
    return KvLink(
        kind=LinkKind.NIC,
        bandwidth_bytes_per_s=min(send, receive),
        latency_s=nic_latency,
        source=(
            f"{p.name} x{prefill.devices} and {d.name} x{decode.devices} profiles: "
            "external_io per device, the smaller aggregate"
        ),
    )


def logical_kv_bytes_per_token(deployment: Deployment) -> float:
    """One token's KV over all layers at the KV precision, counted once (no TP replicas)."""
    m = deployment.model
    return m.n_layers * m.kv_values_per_token_per_layer() * deployment.kv_precision.bytes_per_value


def kv_transfer(
    prefill: Deployment,
    link: KvLink,
    tokens: int,
    *,
    prefill_s: float = 0.0,
    layer_overlap: bool = False,
) -> KvTransfer:
    """Time to move `tokens` tokens of KV over `link`; `prefill_s` is the prefill that the
    transfer may overlap layer by layer when `layer_overlap` is on."""
    if tokens < 0:
        raise ConfigError(f"kv transfer: tokens must be >= 0, got {tokens}")
    size = tokens * logical_kv_bytes_per_token(prefill)
    wire_s = size / link.bandwidth_bytes_per_s
    total = link.latency_s + wire_s
    exposed = total
    if layer_overlap and tokens:
        layers = prefill.model.n_layers
        hidden = prefill_s * (layers - 1) / layers
        exposed = link.latency_s + max(wire_s / layers, wire_s - hidden)
    return KvTransfer(tokens=tokens, bytes=size, time_s=total, exposed_s=exposed)
