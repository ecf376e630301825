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

Transfers compete for the link. Each worker's end of it is a `LinkPort` (a
prefill worker's egress, `KvLink.send_bytes_per_s`; a decode worker's ingress,
`KvLink.receive_bytes_per_s`), and `book` places a transfer on its two ports in
booking order: it takes, at each moment, whatever bandwidth the transfers booked
before it leave free on both ends, up to the smaller end's. Two transfers at once
on ports of equal speed therefore run one after the other (FIFO); a 50 GB/s GPU
and another sending into one 150 GB/s wafer both run at full speed. Booking
order rather than fair sharing because a booking is final: the time a transfer
lands is known when it starts, never moved by one that comes later, so a live
decode worker can announce it at once and live and offline runs agree. Sharing
fairly would end the same total work at the same moment and only reorder who
finishes first. With layer overlap a transfer may start before its prefill ends, but
not before the one booked on its ports before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
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
    bandwidth_bytes_per_s: float  # one transfer's, uncontended: the slower end's
    latency_s: float
    source: str
    send_bytes_per_s: float  # a prefill worker's egress, shared by its transfers
    receive_bytes_per_s: float  # a decode worker's ingress, shared by its transfers

    def describe(self) -> str:
        return f"{self.kind} {self.bandwidth_bytes_per_s / 1e9:,.0f} GB/s"


@dataclass(frozen=True, kw_only=True)
class KvTransfer:
    tokens: int
    bytes: float
    time_s: float  # the whole transfer, from when its first byte could leave to landing
    exposed_s: float  # what adds to TTFT (less than time_s with layer overlap)
    wait_s: float = 0.0  # how much later it landed than on an idle link (other transfers)


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
            send_bytes_per_s=float(spec) * 1e9,
            receive_bytes_per_s=float(spec) * 1e9,
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
            send_bytes_per_s=p.scale_up.bandwidth_bytes_per_s * prefill.devices,
            receive_bytes_per_s=p.scale_up.bandwidth_bytes_per_s * decode.devices,
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
        send_bytes_per_s=send,
        receive_bytes_per_s=receive,
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


@dataclass(frozen=True, slots=True)
class Segment:
    """A transfer's share of a port: `bytes_per_s` from `start_s` to `end_s`."""

    start_s: float
    end_s: float
    bytes_per_s: float


@dataclass(frozen=True, kw_only=True)
class Booking:
    """Where a transfer sits on its ports: queued from `start_s`, its last byte out at
    `end_s`, at the rates of `segments` in between."""

    start_s: float
    end_s: float
    segments: tuple[Segment, ...]


class LinkPort:
    """One worker's end of the link: the bandwidth its booked transfers hold over time.

    A port serves bookings in order: none starts before the one booked before it
    (`after_s`), so what ended by then can no longer matter and is dropped.
    """

    def __init__(self, segments: Iterable[Segment] = (), *, after_s: float = -math.inf) -> None:
        self.segments = list(segments)
        self.after_s = after_s

    def add(self, booking: Booking) -> None:
        self.after_s = max(self.after_s, booking.start_s)
        self.segments = [s for s in self.segments if s.end_s > self.after_s]
        self.segments += booking.segments


def book(
    egress: LinkPort,
    ingress: LinkPort,
    *,
    start_s: float,
    size_bytes: float,
    send_bytes_per_s: float,
    receive_bytes_per_s: float,
) -> Booking:
    """Place `size_bytes` on `egress` (at most `send_bytes_per_s` in all) and `ingress` (at
    most `receive_bytes_per_s`) from `start_s`, or from the later of the two ports' last
    bookings: at each moment the transfer takes what the transfers booked before it leave
    free on both ends. Pure: `LinkPort.add` the result to both ports to keep it."""
    start = max(start_s, egress.after_s, ingress.after_s)
    if size_bytes <= 0:
        return Booking(start_s=start, end_s=start, segments=())
    used = [0.0, 0.0]  # bytes/s held on (egress, ingress) now
    changes: list[tuple[float, int, float]] = []  # (time, port, change in bytes/s held)
    for i, port in enumerate((egress, ingress)):
        for s in port.segments:
            if s.end_s <= start:
                continue
            if s.start_s <= start:
                used[i] += s.bytes_per_s
            else:
                changes.append((s.start_s, i, s.bytes_per_s))
            changes.append((s.end_s, i, -s.bytes_per_s))
    changes.sort()
    # Below this a port is full: sums of rates round, never quite to the capacity.
    full = 1e-9 * min(send_bytes_per_s, receive_bytes_per_s)
    out: list[Segment] = []
    t, left, k = start, size_bytes, 0
    while True:
        while k < len(changes) and changes[k][0] <= t:
            used[changes[k][1]] += changes[k][2]
            k += 1
        nxt = changes[k][0] if k < len(changes) else math.inf
        free = min(send_bytes_per_s - used[0], receive_bytes_per_s - used[1])
        if free > full:
            if t + left / free <= nxt:
                _extend(out, t, t + left / free, free)
                break
            _extend(out, t, nxt, free)
            left -= free * (nxt - t)
        elif nxt == math.inf:
            raise ValueError("kv transfer: a port with no bandwidth")
        t = nxt
    return Booking(start_s=start, end_s=out[-1].end_s, segments=tuple(out))


# Below a nanosecond (what the host's monotonic clock counts in) a wait is rounding.
_CLOCK_RESOLUTION_S = 1e-9


@dataclass(frozen=True, kw_only=True)
class TransferWindow:
    """A transfer about to be booked: when it may start, and its timing on an idle link."""

    ready_s: float  # the prefill's end (or the decode half's claim, if later)
    start_s: float  # its first byte may leave (before `ready_s` with layer overlap)
    floor_s: float  # its last byte leaves no earlier (after the last layer's prefill)
    idle: KvTransfer

    def book(self, egress: LinkPort, ingress: LinkPort, link: KvLink) -> Booking:
        return book(
            egress,
            ingress,
            start_s=self.start_s,
            size_bytes=self.idle.bytes,
            send_bytes_per_s=link.send_bytes_per_s,
            receive_bytes_per_s=link.receive_bytes_per_s,
        )

    def timed(self, booking: Booking, link: KvLink) -> KvTransfer:
        """The transfer as booked: it lands at `ready_s + exposed_s`."""
        landed_s = max(booking.end_s, self.floor_s) + link.latency_s
        wait_s = landed_s - (self.ready_s + self.idle.exposed_s)
        if wait_s < _CLOCK_RESOLUTION_S:
            return self.idle
        idle = self.idle
        return replace(
            idle, time_s=idle.time_s + wait_s, exposed_s=idle.exposed_s + wait_s, wait_s=wait_s
        )


def transfer_window(
    prefill: Deployment,
    link: KvLink,
    tokens: int,
    *,
    ready_s: float,
    prefill_s: float = 0.0,
    layer_overlap: bool = False,
) -> TransferWindow:
    """`kv_transfer`'s transfer, for a prefill that ended at `ready_s`, as a window to book:
    with layer overlap its first layer may leave `prefill_s * (layers - 1) / layers`
    earlier, and its last layer's share only after `ready_s`."""
    idle = kv_transfer(prefill, link, tokens, prefill_s=prefill_s, layer_overlap=layer_overlap)
    start_s = floor_s = ready_s
    if layer_overlap and tokens:
        layers = prefill.model.n_layers
        start_s = ready_s - prefill_s * (layers - 1) / layers
        floor_s = ready_s + idle.bytes / link.bandwidth_bytes_per_s / layers
    return TransferWindow(ready_s=ready_s, start_s=start_s, floor_s=floor_s, idle=idle)


def _extend(out: list[Segment], start_s: float, end_s: float, bytes_per_s: float) -> None:
    """Append a segment, merged into the last one when it runs on at the same rate."""
    if out and out[-1].end_s == start_s and out[-1].bytes_per_s == bytes_per_s:
        start_s = out.pop().start_s
    out.append(Segment(start_s=start_s, end_s=end_s, bytes_per_s=bytes_per_s))
